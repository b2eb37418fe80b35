"""Drop one harmless bitsandbytes notice before peft imports bitsandbytes (the filter lives with the start-up hook,
which installs it too when ``import peft`` comes first)."""

from __future__ import annotations

from _peft_infosteer_autoload import quiet_bitsandbytes_notice

quiet_bitsandbytes_notice()
