"""Refresh generated README sections."""
import re
import subprocess

readme = open("README.md").read()
table = subprocess.run([".venv/bin/rahf", "config", "--markdown"], capture_output=True, text=True, check=True).stdout
readme = re.sub(r"<!-- config-reference:start -->.*<!-- config-reference:end -->", "<!-- config-reference:start -->\n" + table + "<!-- config-reference:end -->", readme, flags=re.S)
open("README.md", "w").write(readme)
