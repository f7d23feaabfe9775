# The ROS 2 wheels on PyPI export CMake targets whose include directories name the Python and NumPy
# headers of the machine that built them (/opt/python/cpXY-cpXY/...). On a normal ROS install those
# paths are real and this file changes nothing. Otherwise, once the whole project is configured,
# every imported target's non-existent /opt/python include directory is pointed at this Python's
# headers and NumPy's headers.

function(trident_ros_repoint_wheel_include_dirs)
  if(NOT Python3_EXECUTABLE)
    find_package(Python3 REQUIRED COMPONENTS Interpreter)
  endif()
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import sysconfig; print(sysconfig.get_paths()['include'])"
    OUTPUT_VARIABLE python_include OUTPUT_STRIP_TRAILING_WHITESPACE)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import numpy; print(numpy.get_include())"
    OUTPUT_VARIABLE numpy_include OUTPUT_STRIP_TRAILING_WHITESPACE)
  get_directory_property(imported_targets IMPORTED_TARGETS)
  foreach(target IN LISTS imported_targets)
    get_target_property(dirs ${target} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT dirs OR NOT dirs MATCHES "/opt/python/cp[0-9]+-cp[0-9]+/")
      continue()
    endif()
    set(fixed "")
    foreach(dir IN LISTS dirs)
      if(NOT EXISTS "${dir}" AND dir MATCHES "^/opt/python/cp[0-9]+-cp[0-9]+/include/")
        set(dir "${python_include}")
      elseif(NOT EXISTS "${dir}" AND dir MATCHES "^/opt/python/cp[0-9]+-cp[0-9]+/.*/numpy/")
        set(dir "${numpy_include}")
      endif()
      list(APPEND fixed "${dir}")
    endforeach()
    set_target_properties(${target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${fixed}")
  endforeach()
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL trident_ros_repoint_wheel_include_dirs)
