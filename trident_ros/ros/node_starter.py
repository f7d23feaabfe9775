"""The nodes of a :class:`~trident_ros.ros.launch_plan.Plan` as processes, without ``launch``.

Each planned node runs as its installed executable (:func:`~trident_ros.ros.launch_plan.command_line`)
in its own process group, with the plan's environment variables added to this process's. With the
plan's autostart, :func:`autostart` configures and then activates each lifecycle node once through
its ``change_state`` service (what the launch file does with lifecycle events); :func:`stop` sends
SIGINT to each group (Ctrl-C), then SIGKILL to those still running. :func:`main` is the same as a
command for machines without ``ros2 launch`` (``ros2 run trident_ros trident_launch demo:=true``,
the launch file's arguments).

    processes = start(plan_launch({'random_weights': 'true'}, share, os.environ), stdout=log)
    try:
        autostart(processes, timeout=120)
        ...
    finally:
        stop(processes)
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import rclpy
from ament_index_python.packages import get_package_prefix, get_package_share_directory
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.executors import SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions

from trident_ros.ros.launch_plan import PACKAGE, Plan, PlannedNode, command_line, plan_launch

STATE_POLL_S = 2.0
"""When a transition has not answered after this long, the node's state is asked, again every this
long: a lost service response cannot stall autostart."""


class StartError(RuntimeError):
    """A planned node did not start or did not reach its state; the message says why."""


@dataclass
class NodeProcess:
    """A planned node and its running process (the leader of its own process group)."""

    node: PlannedNode
    command: list[str]
    environment: dict[str, str]
    popen: subprocess.Popen
    autostart: bool

    def exited(self) -> int | None:
        """Its exit code, None while it runs."""
        return self.popen.poll()


def package_share() -> str:
    """This package's share directory (config files), as the launch file finds it."""
    return get_package_share_directory(PACKAGE)


def start(plan: Plan, stdout: IO | int | None = None, env: Mapping[str, str] | None = None) -> list[NodeProcess]:
    """Start every planned node, each in its own process group.

    Args:
        plan: what to start.
        stdout: where the processes' output (stdout and stderr) goes, as ``subprocess.Popen`` takes it
            (None: this process's own).
        env: the environment the plan's variables are added to (None: ``os.environ``).
    """
    environment = {**(os.environ if env is None else env), **plan.environment}
    processes = []
    for node in plan.nodes:
        command = command_line(node, get_package_prefix(node.package))
        popen = subprocess.Popen(command, env=environment, stdout=stdout, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        processes.append(NodeProcess(node, command, environment, popen, plan.autostart and node.lifecycle))
    return processes


def stop(processes: list[NodeProcess], timeout: float = 15.0) -> list[int]:
    """SIGINT to each process group, SIGKILL to those still running after ``timeout`` s; the exit codes."""
    for process in processes:
        _signal_group(process, signal.SIGINT)
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.popen.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            codes.append(process.popen.wait())
    return codes


def _signal_group(process: NodeProcess, sig: int) -> None:
    if process.exited() is None:  # not reaped yet: its group exists even if it just exited
        os.killpg(process.popen.pid, sig)


def autostart(processes: list[NodeProcess], timeout: float) -> None:
    """Configure, then activate, each process's lifecycle node that the plan autostarts.

    Raises:
        StartError: a process exited, a transition failed, or ``timeout`` s passed first.
    """
    chosen = [process for process in processes if process.autostart]
    if not chosen:
        return
    domain_id = chosen[0].environment.get('ROS_DOMAIN_ID')
    client = _LifecycleClient(time.monotonic() + timeout, int(domain_id) if domain_id else None)
    try:
        for process in chosen:
            client.start_up(process)
    finally:
        client.close()


class _LifecycleClient:
    """A node of its own (own rclpy context, no signal handlers) calling lifecycle services.

    Args:
        deadline: ``time.monotonic()`` after which waiting fails.
        domain_id: the nodes' ROS domain (None: ROS's default).
    """

    def __init__(self, deadline: float, domain_id: int | None) -> None:
        self._deadline = deadline
        self._context = rclpy.Context()
        rclpy.init(args=[], context=self._context, domain_id=domain_id,
                   signal_handler_options=SignalHandlerOptions.NO)
        self._node = rclpy.create_node('trident_node_starter', context=self._context)
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self._node)

    def close(self) -> None:
        self._executor.shutdown()
        self._node.destroy_node()
        self._context.try_shutdown()

    def start_up(self, process: NodeProcess) -> None:
        """Configure ``process``'s node, then activate it; each step is done when the service answers success
        or when ``get_state`` reports its goal state (Fast DDS may lose a brand-new client's answer).
        """
        name = process.node.full_name
        change = self._node.create_client(ChangeState, f'{name}/change_state')
        get_state = self._node.create_client(GetState, f'{name}/get_state')
        try:
            self._spin_until(process, lambda: change.service_is_ready() and get_state.service_is_ready(),
                             f'the lifecycle services of {name}')
            time.sleep(0.5)  # Fast DDS: a server may answer a brand-new client before it matched the reply reader
            state = _StateQuery(get_state, first_after=0.0)
            self._spin_until(process, lambda: state.label() is not None, f'the lifecycle state of {name}')
            for transition_id, goal in ((Transition.TRANSITION_CONFIGURE, 'inactive'),
                                        (Transition.TRANSITION_ACTIVATE, 'active')):
                changed = change.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
                state = _StateQuery(get_state, first_after=STATE_POLL_S)

                def reached(changed: Any = changed, state: _StateQuery = state, goal: str = goal) -> bool:
                    if changed.done() and not changed.result().success:
                        raise StartError(f'{name} did not reach {goal}: the transition failed (see its log)')
                    return changed.done() or state.label() == goal

                self._spin_until(process, reached, f'{name} to become {goal}')
        finally:
            self._node.destroy_client(change)
            self._node.destroy_client(get_state)

    def _spin_until(self, process: NodeProcess, condition: Callable[[], bool], what: str) -> None:
        while not condition():
            if process.exited() is not None:
                raise StartError(f'{process.node.executable} exited (code {process.exited()}) while waiting for {what}')
            if time.monotonic() > self._deadline:
                raise StartError(f'timed out waiting for {what}')
            self._executor.spin_once(timeout_sec=0.1)


class _StateQuery:
    """A node's lifecycle state label, asked ``first_after`` s from now, then every ``STATE_POLL_S`` (an answer may
    be lost).
    """

    def __init__(self, client: Any, first_after: float) -> None:
        self._client = client
        self._asked_at = time.monotonic() + first_after - STATE_POLL_S
        self._future: Any = None
        self._latest: str | None = None

    def label(self) -> str | None:
        """The latest answer (None before the first); asks again when it is time."""
        if self._future is not None and self._future.done():
            self._latest = self._future.result().current_state.label
        if time.monotonic() - self._asked_at > STATE_POLL_S:
            self._asked_at, self._future = time.monotonic(), self._client.call_async(GetState.Request())
        return self._latest


def main(argv: list[str] | None = None) -> int:
    """``trident_launch [name:=value ...]``: the launch file's nodes, started and autostarted without launch.

    Runs until Ctrl-C or SIGTERM (then stops the nodes: exit 0) or until a node exits (its exit code).
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog='trident_launch', description=main.__doc__.splitlines()[0])
    parser.add_argument('arguments', nargs='*', metavar='name:=value', help="the launch file's arguments")
    args = parser.parse_args(argv)
    values = dict(item.split(':=', 1) for item in args.arguments if ':=' in item)
    malformed = [item for item in args.arguments if ':=' not in item]
    try:
        if malformed:
            raise ValueError(f'expected name:=value, got {malformed}')
        plan = plan_launch(values, package_share(), os.environ)
    except ValueError as error:
        parser.error(str(error))
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's background job starts with it ignored
        signal.signal(signum, _interrupt)
    processes = start(plan)
    code = 0
    try:
        autostart(processes, timeout=600.0)
        while all(process.exited() is None for process in processes):
            time.sleep(0.2)
        code = next(process.exited() for process in processes if process.exited() is not None)
    except StartError as error:
        print(f'trident_launch: {error}', file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        pass
    finally:
        stop(processes)
    return code


def _interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
    """SIGINT and SIGTERM end :func:`main` (it then stops the nodes)."""
    raise KeyboardInterrupt
