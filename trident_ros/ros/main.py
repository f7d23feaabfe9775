"""``ros2 run trident_ros trident_node``: the trident node's process (signals, executor, exit).

SIGINT or SIGTERM ends it with exit code 0 within ~1.5 s, even mid-frame.
"""
from __future__ import annotations

import gc
import os
import signal
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from trident_ros.ros.node import TridentNode

SHUTDOWN_WAIT_S = 1.0  # how long shutdown waits for a frame in progress


def ignore_repeated_signals() -> None:
    """Set SIGINT and SIGTERM to SIG_IGN before rclpy installs its handlers over them.

    rclpy's handlers shut the node down on the first signal and, at shutdown, restore what they
    found. A terminal's Ctrl-C reaches the whole process group and ``ros2 launch`` forwards one
    more SIGINT: with Python's defaults restored, that second signal would kill the exiting
    process ("exit code -2"). SIG_IGN also survives interpreter teardown, which resets Python
    callables to SIG_DFL.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def main(args: list[str] | None = None) -> None:
    """Spin a :class:`TridentNode` on a 4-thread executor until a signal; exits 0.

    Args:
        args: command-line arguments for ``rclpy.init`` (None: ``sys.argv``).
    """
    finished = True
    ignore_repeated_signals()
    try:
        rclpy.init(args=args)  # plain init: its context-manager form exists only on Kilted (rclpy >= 8)
        node = TridentNode()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        try:
            executor.spin()
        except Exception:
            if rclpy.ok():
                raise
            # else a signal shut the context down while the executor built its wait set
        finally:
            finished = node.stop_worker(SHUTDOWN_WAIT_S)
            finished = executor.shutdown(timeout_sec=0.5) and finished
            node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()  # rclpy.shutdown() raises on Jazzy once a signal has shut the context down
    # Interpreter teardown would garbage-collect torch's and open_clip's module graphs (about 1 s
    # on a busy CPU); nothing there needs collecting before exit.
    gc.disable()
    gc.freeze()
    if not finished:
        # A frame (or a model load) is still inside torch: waiting could take seconds, and
        # interpreter teardown under a running op can crash. Nothing is left to save: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == '__main__':
    main()
