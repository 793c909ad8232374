"""``resilient run``: start a training command, relay stop signals to its whole
process tree, enforce the grace period, restart after crashes and hangs, and
keep the event journal. See docs/launcher.md."""

from resilient.launcher.options import EXIT_HUNG, EXIT_KILLED, EXIT_NOT_FOUND, LaunchOptions
from resilient.launcher.runner import Launcher

__all__ = ["EXIT_HUNG", "EXIT_KILLED", "EXIT_NOT_FOUND", "LaunchOptions", "Launcher"]
