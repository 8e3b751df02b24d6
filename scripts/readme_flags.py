"""Rewrites README.md's flags block from `parca-agent --help` (a test keeps them equal)."""

import os
import re
import subprocess
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
env = dict(os.environ, COLUMNS="100")
env = {k: v for k, v in env.items() if not k.startswith("PARCA_AGENT_")}
help_text = subprocess.run([sys.executable, "-m", "services.cli", "--help"], cwd=root, env=env,
                           capture_output=True, text=True, check=True).stdout
readme = root / "README.md"
text = readme.read_text()
block = f"<!-- flags:begin -->\n```\n{help_text}```\n<!-- flags:end -->"
new = re.sub(r"<!-- flags:begin -->.*?<!-- flags:end -->", lambda _: block, text, flags=re.S)
readme.write_text(new)
