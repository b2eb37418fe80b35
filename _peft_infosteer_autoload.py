"""Post-import hook: PEFT knows the INFOSTEER method without ``import peft_infosteer`` in user code.

Installed with the distribution as ``peft_infosteer_autoload.pth`` (one ``import`` line, run by ``site`` at every
interpreter start) and ``peft_infosteer_autoload.start`` (PEP 829, Python >= 3.15, which prefers it over the ``.pth``
import line). Tools that load adapters where no import can be added (``lm_eval --model_args peft=...``,
``AutoPeftModelForCausalLM`` in someone else's script, ``pipeline``) then find the method registered.

At start-up this only puts a small finder at the front of ``sys.meta_path``; it imports nothing (``os`` and ``sys``
are already loaded), and in particular neither torch nor peft. When ``peft`` is imported, the finder lets the normal
finders produce peft's spec and wraps that spec's ``loader.exec_module`` so that, once ``peft/__init__.py`` has run to
the end, ``peft_infosteer`` is imported (which registers the method); then it removes itself. If ``peft`` is already
fully imported when ``install()`` runs, the plugin is imported at once.

Registering is all it does: importing ``peft_infosteer`` patches no upstream class and changes no logging (the
model-card wrappers of ``peft_infosteer.hub`` are installed when the first InfoSteer model is built), so a process
that never builds an InfoSteer model behaves as without the package. In an editable install, ``_build_pth.py`` puts a
stub of this module in site-packages that runs this file from the project, so edits here take effect without a
reinstall.

Switch off: ``PEFT_INFOSTEER_AUTOLOAD=0`` (also ``false``/``no``/``off``), read at start-up and again when peft is
imported. A plugin that fails to import never breaks ``import peft``: it warns (RuntimeWarning) and PEFT stays as it
was.
"""

import os
import sys

TARGET = "peft"
PLUGIN = "peft_infosteer"
ENV = "PEFT_INFOSTEER_AUTOLOAD"

# the package reads its other switches with peft_infosteer._env, which this standalone module must not import: the
# same values, checked by tests/test_registration.py
OFF_VALUES = ("0", "false", "no", "off")

__all__ = ["ENV", "OFF_VALUES", "enabled", "install", "uninstall"]


def enabled() -> bool:
    """Whether ``PEFT_INFOSTEER_AUTOLOAD`` leaves the hook on (unset: on)."""
    return os.environ.get(ENV, "1").strip().lower() not in OFF_VALUES


def _import_plugin() -> None:
    if not enabled() or PLUGIN in sys.modules:
        # already imported, or being imported (its own `import peft` brought us here): it registers itself
        return
    try:
        __import__(PLUGIN)
    except Exception as exc:  # never break `import peft`
        import warnings

        message = (
            f"{PLUGIN} is installed but failed to import after `import {TARGET}`, so its PEFT method is not "
            f"registered ({type(exc).__name__}: {exc}). `import {PLUGIN}` shows the full error; "
            f"{ENV}=0 switches this automatic import off."
        )
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        except Exception:  # warnings turned into errors (-W error, pytest filterwarnings=error): still never raise
            sys.stderr.write(f"RuntimeWarning: {message}\n")


class _PeftImportHook:
    """Meta path finder for ``peft`` only; removes itself after peft's first successful import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        spec = None
        for finder in list(sys.meta_path):
            if isinstance(finder, _PeftImportHook):
                continue
            find = getattr(finder, "find_spec", None)
            if find is not None:
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        if spec is None:
            return None  # peft not installed: let the import fail as usual
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec  # namespace package, or a class-level loader we must not patch for everyone
        original = loader.exec_module

        def exec_module(module):
            try:
                original(module)  # peft/__init__.py runs to the end (or raises: then nothing is registered)
            finally:
                loader.__dict__.pop("exec_module", None)  # back to the class method: peft.__loader__ is untouched
            uninstall()
            _import_plugin()

        try:
            loader.exec_module = exec_module  # an instance attribute: each find_spec call gets its own loader
        except (AttributeError, TypeError):
            pass
        # A spec that is only looked at (transformers' `importlib.util.find_spec("peft")` availability probe) is
        # dropped with its patched loader; the hook stays until a real import executes peft.
        return spec


def install() -> None:
    if not enabled() or any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
        return
    module = sys.modules.get(TARGET)
    if module is not None:
        spec = getattr(module, "__spec__", None)
        if not getattr(spec, "_initializing", False):
            _import_plugin()  # peft is already fully imported
            return
        # peft is half-imported right now (install() called from inside peft's own import): too late to wrap it
    sys.meta_path.insert(0, _PeftImportHook())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftImportHook)]
