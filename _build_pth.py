"""Build helper (not installed): put the start-up hook files at the root of the wheel, editable wheels included.

Wired in pyproject.toml with ``[tool.setuptools] cmdclass = { build_py = "_build_pth.build_py" }`` (setuptools
loads this file from the project root; MANIFEST.in lists it so that builds from the sdist find it). setuptools'
``data-files`` would put a ``.pth`` under ``sys.prefix``, where ``site`` never reads it, and skip it for editable
installs; this command writes it next to the packages in both cases. See ``_peft_infosteer_autoload.py``.
"""

import os

from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ("peft_infosteer_autoload.pth", "peft_infosteer_autoload.start")


class build_py(_build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            # PEP 660 (setuptools >= 64): build_lib is a throw-away folder here; setuptools' editable_wheel points
            # install_lib at the unpacked editable wheel, and whatever lies there goes to site-packages.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib  # `pip install .` / `python -m build`: the wheel is made from build_lib
        # editable: also a real copy of the hook module, found by the ordinary path finder (about 0.15 ms) instead of
        # through setuptools' editable finder (about 2 ms); edits to it then need a re-install
        for name in FILES + (("_peft_infosteer_autoload.py",) if self.editable_mode else ()):
            self.copy_file(os.path.join(HERE, name), os.path.join(target, name))

    def get_source_files(self):
        return [*super().get_source_files(), *FILES]
