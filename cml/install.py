"""Cloudera ML: install kubetune into the project's Python (the AMP's first task, a session).

CML sessions, jobs and applications of one project share its files and its pip --user site, so this runs once.
"""

import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--user", "--editable", ".[ui]"])
print("kubetune installed: the stage jobs and the compare application can start")
