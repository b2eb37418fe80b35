"""Build helper (not installed): put the start-up hook files at the root of the wheel, editable wheels included.

Wired in pyproject.toml with ``[tool.setuptools] cmdclass = { build_py = "_build_pth.build_py" }`` (setuptools
loads this file from the project root; MANIFEST.in lists it so that builds from the sdist find it). setuptools'
``data-files`` would put a ``.pth`` under ``sys.prefix``, where ``site`` never reads it, and skip it for editable
installs; this command writes it next to the packages in both cases. See ``_peft_infosteer_autoload.py``.

In an editable install the hook module is a generated stub in site-packages that runs the project's
``_peft_infosteer_autoload.py`` by its absolute path (through its ``__pycache__``), so edits to the hook take effect
at the next interpreter start without a reinstall, and the ``.pth`` line finds the module with the ordinary path
finder rather than through setuptools' editable finder.
"""

import os

from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ("peft_infosteer_autoload.pth", "peft_infosteer_autoload.start")
HOOK = "_peft_infosteer_autoload.py"

# the editable install's hook module; imports only what site has already loaded, never torch or peft
EDITABLE_STUB = """\
\"\"\"Editable install of peft-infosteer (written by its _build_pth.py): runs the project's start-up hook module.\"\"\"

import sys
from importlib.machinery import SourceFileLoader

__file__ = {source!r}
try:
    SourceFileLoader(__name__, __file__).exec_module(sys.modules[__name__])
except OSError as exc:
    raise ImportError(
        f"peft-infosteer is installed in editable mode from {{__file__}}, which cannot be read ({{exc}}): "
        "reinstall it (pip install -e <project>) or uninstall it"
    ) from exc
"""


class build_py(_build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            # PEP 660 (setuptools >= 64): build_lib is a throw-away folder here; setuptools' editable_wheel points
            # install_lib at the unpacked editable wheel, and whatever lies there goes to site-packages.
            target = self.get_finalized_command("install").install_lib
            self.mkpath(target)
            with open(os.path.join(target, HOOK), "w", encoding="utf-8") as stub:
                stub.write(EDITABLE_STUB.format(source=os.path.join(HERE, HOOK)))
        else:
            target = self.build_lib  # `pip install .` / `python -m build`: the wheel is made from build_lib
        for name in FILES:
            self.copy_file(os.path.join(HERE, name), os.path.join(target, name))

    def get_source_files(self):
        return [*super().get_source_files(), *FILES]
