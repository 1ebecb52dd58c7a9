"""User errors: mistakes in what a user gave, reported as a message (exit status 2), never as a bug.

The rule the command line (:mod:`rdn.cli`) follows:

- An error of one of the :func:`user_error_types` is the user's to fix (an option, a file, a
  folder, the data): ``rdn`` prints ``rdn COMMAND: error: MESSAGE`` and exits with status 2.
  These are :class:`UserError` and its subclasses below, and the library's named refusals that
  are older than this module: :class:`rdn.config.ConfigError` (a config that cannot be built,
  e.g. ``--warmup-epochs`` above ``--epochs``), :class:`rdn.files.RunFolderError` (an unusable
  ``--out``), :class:`rdn.files.UnsafeFileError` and :class:`rdn.train.CheckpointMismatchError`
  (a file that is not what it should be).
- Anything else is a bug in rdn (or torch): it keeps its traceback (exit status 1). A bare
  ``ValueError`` is *not* a user error: the CLI never catches it around a whole command.
- Some library functions still refuse bad input with a plain ``ValueError``
  (:func:`rdn.data.load_dataset`, :func:`rdn.nest`, :func:`rdn.train.fit` before its first
  step). The shared steps (:mod:`rdn.steps`) convert those at exactly that call into
  :class:`DataError`, :class:`SurgeryError` and :class:`TrainingRefused`, chaining the original.

``RDN_TRACEBACK=1`` in the environment prints the traceback of user errors too.
"""

from __future__ import annotations

__all__ = [
    "CliError",
    "DataError",
    "DeployError",
    "RunMismatchError",
    "SurgeryError",
    "TrainingRefused",
    "UserError",
    "user_error_types",
]


class UserError(Exception):
    """A mistake in what the user gave: reported without a traceback, exit status 2."""


class CliError(UserError):
    """Command-line options that do not go together, or name something that is not there."""


class DataError(UserError):
    """The dataset cannot be loaded: its files are missing or unreadable, or a data option does not fit it."""


class SurgeryError(UserError):
    """:func:`rdn.nest` refused the model or the options (e.g. a MAC budget out of reach)."""


class TrainingRefused(UserError):
    """:func:`rdn.train.fit` refused its inputs before training (e.g. a batch larger than the data)."""


class RunMismatchError(UserError):
    """A run folder holds a run made with other settings than the ones given: it cannot be resumed."""


class DeployError(UserError):
    """Inference or export cannot run as asked: no images, no decoder, no policy, an unavailable format."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type that means "the user's input is wrong" (module docstring)."""
    from rdn.config import ConfigError
    from rdn.files import RunFolderError, UnsafeFileError
    from rdn.train.checkpoint import CheckpointMismatchError

    return (UserError, ConfigError, RunFolderError, UnsafeFileError, CheckpointMismatchError)
