"""Refresh README's generated sections: the config reference of `rahf align` and of `rahf baseline`."""
import re
import subprocess

SECTIONS = {  # marker -> the command that prints the section
    "config-reference": [".venv/bin/rahf", "config", "--markdown"],
    "baseline-config-reference": [".venv/bin/rahf", "config", "baseline", "--markdown"],
}

readme = open("README.md").read()
for marker, command in SECTIONS.items():
    table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in readme:
        raise SystemExit(f"README.md has no {start} ... {end} section")
    section = f"{start}\n{table}{end}"
    readme = re.sub(f"{start}.*{end}", lambda _, section=section: section, readme, flags=re.S)
open("README.md", "w").write(readme)
