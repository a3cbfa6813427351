"""Evaluation while pre-training: a quick linear evaluation of each checkpoint from --eval_after on (in
the background), and the full one of the last checkpoint (waited for).

With --eval_scripts DIR (train_audio.py passes its own folder, as published), DIR's quick_eval.sh and
all_eval.sh run as `bash SCRIPT /abs/checkpoint`; otherwise the same suites run built in:
`python -m m2d eval suite CHECKPOINT --config quick|all`. Either runs in the folder training was started
from, so results land in ./results as with every evaluation command; its output goes to the run folder
(quick_eval-N.log, all_eval.log).
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional


def evaluation_command(kind: str, checkpoint: Path, scripts: str) -> Optional[list[str]]:
    """The command that evaluates `checkpoint` (kind 'quick' or 'all'); None when --eval_scripts lacks it."""
    if not scripts:
        return [sys.executable, '-m', 'm2d', 'eval', 'suite', str(checkpoint.resolve()), '--config', kind]
    script = Path(scripts) / f'{kind}_eval.sh'
    return ['bash', str(script), str(checkpoint.resolve())] if script.is_file() else None


def evaluate(kind: str, checkpoint: Path, scripts: str, wait: bool,
             print_fn: Callable[[str], None] = print) -> Optional[subprocess.Popen]:
    """Start the `kind` evaluation of `checkpoint`, output to its run folder; wait=True streams the output
    to the console and waits. A missing script is reported and skipped. -> the process (None if skipped)."""
    cmd = evaluation_command(kind, checkpoint, scripts)
    if cmd is None:
        print_fn(f'{kind}_eval.sh not found in {scripts}: skipping it for {checkpoint.name} '
                 '(add the script, or leave out --eval_scripts for the built-in evaluation)')
        return None
    log_path = checkpoint.parent / (f'{kind}_eval-{checkpoint.stem.split("-")[-1]}.log' if not wait
                                    else f'{kind}_eval.log')
    env = {**os.environ, 'M2D_PYTHON': sys.executable}
    print_fn(f'Running {" ".join(cmd)} ({"waiting" if wait else "in the background"}; output: {log_path})')
    if not wait:
        with open(log_path, 'ab') as log:
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    with open(log_path, 'a') as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            print_fn(line.rstrip('\n'))
            log.write(line)
        proc.wait()
    what = f'{kind}_eval.sh' if scripts else f'm2d eval suite --config {kind}'
    print_fn(f'{what} finished with exit status {proc.returncode}')
    return proc
