"""The documentation's commands and links work as written. Every `python ppo_*.py ...` and `python benchmarks/...`
command in README.md, docs/*.md and benchmarks/README.md (code blocks and inline code) is parsed by the script's own
CLI (`tyro.cli(Args, args=flags)`), and a training script's `check_args` must accept it; every relative link and
image points to a file (and heading) that exists; CI runs exactly the README's test command. Nothing is run."""

import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys

import pytest
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "benchmarks/README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))
SCRIPT = re.compile(r"^(ppo_\w+|benchmarks/bench_\w+)\.py$")
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
SEPARATORS = {"&&", "||", ";", "&", "|", ";;"}


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


def split_fences(text: str):
    """(prose with the fenced blocks blanked out, [(language, first line number, block text)])."""
    prose, blocks, fence = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, start, body = stripped[3:].strip(), number + 1, []
            prose.append("")
        elif fence is not None and stripped.startswith("```"):
            blocks.append((fence, start, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: its tokens split at `&&`, `;`, `&`, `|`, comments dropped."""
    lexer = shlex.shlex(line.replace("$i", "0"), posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def script_invocations(tokens: list[str]):
    """(script, flags) for every `python SCRIPT FLAGS` in one simple command (`srun python ...` included)."""
    for i, token in enumerate(tokens[:-1]):
        if token in ("python", "python3") and SCRIPT.match(tokens[i + 1]):
            yield tokens[i + 1], tokens[i + 2 :]


def documented_commands():
    found = []
    for doc in DOCS:
        prose, blocks = split_fences(read(doc))
        for language, start, body in blocks:
            if language not in SHELL_FENCES:
                continue
            logical, first = "", None  # a shell line with its continuation lines joined, and where it starts
            for number, line in enumerate(body.splitlines(), start):
                logical, first = logical + line, first or number
                if line.endswith("\\"):
                    logical = logical[:-1] + " "
                    continue
                for tokens in shell_commands(logical):
                    for script, flags in script_invocations(tokens):
                        found.append((f"{doc}:{first}", script, flags))
                logical, first = "", None
        for match in re.finditer(r"`(python3? [^`]+)`", prose):
            number = prose.count("\n", 0, match.start()) + 1
            for tokens in shell_commands(" ".join(match.group(1).split())):
                for script, flags in script_invocations(tokens):
                    found.append((f"{doc}:{number}", script, flags))
    return found


COMMANDS = documented_commands()


def load(script: str):
    """The script as a module: the training scripts from the repository root, a benchmark from its folder (it imports
    bench_common from there)."""
    name = script[: -len(".py")]
    if "/" not in name:
        return importlib.import_module(name)
    module_name = "docs_" + os.path.basename(name)
    if module_name not in sys.modules:
        folder = os.path.join(ROOT, os.path.dirname(script))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def test_every_script_is_documented_and_commands_were_found():
    scripts = {script for _, script, _ in COMMANDS}
    for path in ["ppo_s5_popgym.py", "ppo_lstm_popgym.py", "ppo_s5_memory.py", "ppo_s5_metarl.py"]:
        assert path in scripts, f"no documented command runs {path}"
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("where, script, flags", COMMANDS, ids=[f"{w} {s}" for w, s, _ in COMMANDS])
def test_documented_command_parses(where, script, flags):
    assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script} does not exist"
    module = load(script)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = tyro.cli(module.Args, args=flags)
    except SystemExit as exit:
        if "--help" in flags and exit.code == 0:
            return
        pytest.fail(f"{where}: python {script} {shlex.join(flags)}\n{err.getvalue()[-2000:]}")
    if hasattr(module, "check_args"):  # the training scripts: the values must pass their own checks too
        assert module.check_args(args) is None, f"{where}: {module.check_args(args)}"


def anchors(doc: str) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    prose, _ = split_fences(read(doc))
    headings = re.findall(r"^#{1,6} +(.+?) *$", prose, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_and_images_exist():
    broken = []
    for doc in DOCS:
        prose, _ = split_fences(read(doc))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
            if not os.path.exists(resolved):
                broken.append(f"{doc}: {target} (no such file)")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(os.path.relpath(resolved, ROOT)):
                broken.append(f"{doc}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_requirement_files_named_in_the_docs_exist():
    for doc in DOCS:
        for name in re.findall(r"-r (\S+\.txt)", read(doc)):
            assert os.path.isfile(os.path.join(ROOT, name)), f"{doc}: {name}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = [line for line in read("README.md").splitlines() if "python -m pytest tests -n 2" in line]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line for line in f.read().splitlines() if line and not line.startswith("#")]
    assert len(readme) == 1 and ci[-1] == readme[0]
    assert "-r requirements.txt" in readme[0] and "-r requirements-dmc.txt" in readme[0]
