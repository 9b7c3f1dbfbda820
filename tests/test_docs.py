"""The docs say what the code does: every ``plexus ...`` command line in the code blocks of
README.md, docs/ and examples/ (also the plexus arguments after the ``--`` of the launch
scripts) is parsed by the real CLI, and every ``--option`` the docs mention, in code or prose,
belongs to the command it is written for: a plexus command, a launch script, a benchmarks/
script, or a tool such as mpirun or sbatch. A renamed or removed option fails here, not for a
user.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import click
import pytest

from plexus.commands import main as cli
from tests.helpers import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
        *sorted((REPO_ROOT / "examples").glob("*.md"))]
OPTION = re.compile(r"--[a-z][a-z0-9-]*[a-z0-9](?![\w.-])")
SHELL_BLOCKS = ("", "sh", "bash", "console", "shell")

# The other tools' options the docs show (checked against these lists; the launch scripts' and
# benchmarks/ scripts' own are read from their sources).
TOOLS = {
    "mpirun": {"--hostfile", "--oversubscribe", "--bind-to", "--with-ft", "--allow-run-as-root", "--prefix",
               "--mca", "--prtemca", "--np"},
    "srun": {"--mpi", "--kill-on-bad-exit", "--ntasks", "--nodes"},
    "sbatch": {"--export", "--ntasks", "--nodes", "--gpus-per-task", "--gres", "--ntasks-per-node",
               "--cpus-per-task", "--signal", "--time", "--output", "--job-name"},
    "scancel": {"--batch", "--signal"},
    "salloc": set(),
    "pip": {"--no-binary", "--force-reinstall", "--index-url", "--upgrade"},
    "py-spy": {"--nonblocking", "--native"},
    "curl": set(),
    "ssh": set(),
}
MPIRUN = ("mpirun", "mpiexec", "prterun")


def documents() -> dict[Path, str]:
    return {p: p.read_text() for p in DOCS}


def fenced_lines(text: str) -> list[str]:
    """Shell lines of the fenced code blocks: continuations joined, '$ ' prompts dropped."""
    lines = []
    for lang, block in re.findall(r"```([^\n]*)\n(.*?)```", text, flags=re.S):
        if lang.strip() in SHELL_BLOCKS:
            lines += [ln.strip().removeprefix("$ ") for ln in block.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("#", "plexus:", "plexus["))]


def inline_spans(text: str) -> list[str]:
    """Inline code spans (which may run across a line break)."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]


def words(line: str) -> list[str]:
    """Shell words, with shell operators apart; ``[optional]`` brackets and ``...`` dropped."""
    line = re.sub(r"<[A-Za-z][^<>]*>", "PLACEHOLDER", line)  # <jobid>, <plexus repo>
    lex = shlex.shlex(line.replace("[", " ").replace("]", " "), posix=True, punctuation_chars=";&|<>()")
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        out = list(lex)
    except ValueError:  # an unbalanced quote in prose
        out = line.split()
    return [w for w in out if w not in ("...", "…")]


def segments(line: str) -> list[tuple[str, list[str]]]:
    """(program, its arguments) for each program a shell line runs: "plexus SUB" for Plexus,
    "launch" for the launch scripts, "script:PATH" for a repository script, or the tool's name."""
    out: list[tuple[str, list[str]]] = []
    ws = words(line)
    i = 0
    while i < len(ws):
        w, name = ws[i], Path(ws[i]).name
        prog = None
        if name == "plexus" or (w == "-m" and i + 1 < len(ws) and ws[i + 1] == "plexus"):
            i += 0 if name == "plexus" else 1
            if i + 1 < len(ws) and re.fullmatch(r"[a-z][a-z-]*", ws[i + 1]):
                i += 1
                prog = "plexus " + ws[i]
            else:
                prog = "plexus"
        elif re.fullmatch(r"(\./)?launch/\w+\.sh", w) or w.endswith("/launch/serve.sh"):
            prog = "launch:" + name
        elif w.endswith(".py") and (REPO_ROOT / w).is_file():
            prog = "script:" + w
        elif name in MPIRUN:
            prog = "mpirun"
        elif name in TOOLS:
            prog = name
        elif w in ("--",) and out and out[-1][0].startswith("launch:"):
            prog = "plexus " + ("serve" if "serve" in out[-1][0] else "generate")
        elif w in (";", "&&", "||", "|", "&", ">", ">>", "<", "(", ")"):
            prog = "shell"
        if prog is not None:
            out.append((prog, []))
        elif out:
            out[-1][1].append(w)
        i += 1
    return [(p, [a for a in args if a not in ("shell",)]) for p, args in out if p != "shell"]


def plexus_command(sub: str) -> click.Command | None:
    return cli.main.get_command(click.Context(cli.main), sub)


def options_of(prog: str) -> set[str] | None:
    """The long options ``prog`` takes (None: a program this test does not know)."""
    if prog == "plexus":
        return {"--help", "--version"}
    if prog.startswith("plexus "):
        cmd = plexus_command(prog.split()[1])
        return None if cmd is None else {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    if prog.startswith("launch:"):
        script = (REPO_ROOT / "launch" / prog[7:]).read_text()
        sourced = re.findall(r"^source .*/(serve\.sh)\b", script, flags=re.M)  # batch.sh: serve.sh's parser
        texts = [script, *((REPO_ROOT / "launch" / s).read_text() for s in sourced)]
        return {"--help"} | {c for t in texts for case in re.findall(r"^\s*([-|a-z]+)\)", t, flags=re.M)
                             for c in case.split("|") if c.startswith("--")}
    if prog.startswith("script:"):
        tree = ast.parse((REPO_ROOT / prog[7:]).read_text())
        return {a.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "add_argument"
                for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return TOOLS.get(prog)


def all_plexus_options() -> set[str]:
    return set().union(*(options_of(f"plexus {s}") for s in cli.main.list_commands(click.Context(cli.main))))


def test_the_reader_finds_the_commands():
    """What the other tests read: the README's commands are among them; a shell line splits
    into its programs with their own arguments."""
    subs = {p for text in documents().values() for ln in fenced_lines(text) for p, _ in segments(ln)}
    assert {"plexus generate", "plexus serve", "plexus plan", "plexus bench", "plexus demo-model",
            "plexus perplexity"} <= subs, subs
    assert segments("mpirun -n 2 --bind-to none plexus generate --model DIR --prompt 'a b' > out.txt  # c") == [
        ("mpirun", ["-n", "2", "--bind-to", "none"]), ("plexus generate", ["--model", "DIR", "--prompt", "a b"])]
    assert segments("launch/serve.sh --hostfile h -- --model m [--port 8000]") == [
        ("launch:serve.sh", ["--hostfile", "h"]), ("plexus serve", ["--model", "m", "--port", "8000"])]


def test_every_documented_plexus_command_line_parses(tmp_path):
    """Each command line of a code block, with the real click command (types, choices, unknown
    options); a --config file named there is replaced by an empty one."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    checked, failures = 0, []
    for path, text in documents().items():
        for line in fenced_lines(text):
            for prog, args in segments(line):
                if not prog.startswith("plexus "):
                    continue
                sub = prog.split()[1]
                cmd = plexus_command(sub)
                if cmd is None:
                    failures.append(f"{path.name}: 'plexus {sub}' is not a command: {line}")
                    continue
                args = [str(empty) if i and args[i - 1] == "--config" else a for i, a in enumerate(args)]
                try:
                    cmd.make_context(sub, args)
                except click.exceptions.Exit:  # --help
                    pass
                except click.ClickException as e:
                    failures.append(f"{path.name}: {line!r}: {e.format_message()}")
                checked += 1
    assert checked >= 20, checked
    assert not failures, "\n".join(failures)


def test_every_documented_option_belongs_to_its_command():
    failures = []
    ours = all_plexus_options()
    tools = set().union(*TOOLS.values())
    for path, text in documents().items():
        spans = inline_spans(text)
        for line in fenced_lines(text) + spans:
            for prog, args in segments(line):
                known = options_of(prog)
                for opt in {a.split("=", 1)[0] for a in args if OPTION.fullmatch(a.split("=", 1)[0])}:
                    if known is None:
                        failures.append(f"{path.name}: {line!r}: {prog} is not a program this test knows")
                    elif opt not in known:
                        failures.append(f"{path.name}: {line!r}: {opt} is not an option of {prog}")
        # prose and tables name options on their own: Plexus's, a launch script's, or a tool's
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        scripts = set().union(*(options_of(f"launch:{p.name}") for p in (REPO_ROOT / "launch").glob("*.sh")))
        for opt in set(OPTION.findall(prose)):
            in_a_command = any(opt in " ".join(a for _, a in segments(s) for a in a) for s in spans)
            if opt not in ours | scripts | tools and not in_a_command:
                failures.append(f"{path.name}: {opt} is not an option of any plexus command")
    assert not failures, "\n".join(sorted(set(failures)))


@pytest.mark.parametrize("sub", ["generate", "serve", "bench", "plan", "perplexity"])
def test_each_command_documents_its_options(sub):
    """Every option of generate, serve, bench, plan and perplexity is named somewhere in the docs (by any
    of its spellings)."""
    text = "\n".join(documents().values())
    words_in_docs = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", text))
    missing = sorted(p.opts[0] for p in plexus_command(sub).params
                     if not set(p.opts + p.secondary_opts) & words_in_docs)
    assert not missing, f"plexus {sub}: {missing} are in its --help but in no doc"


def test_size_units_are_the_same_in_the_docs_the_help_and_the_parser():
    """The units docs/pooling.md and --max-memory's help list are exactly those parse_size reads."""
    from plexus.parallel.sizes import _UNITS, parse_size

    pooling = (REPO_ROOT / "docs" / "pooling.md").read_text()
    listed = re.search(r"\(units: ([^)]*)\)", pooling, flags=re.S).group(1)
    (help_text,) = [p.help for p in plexus_command("generate").params if p.name == "max_memory"]
    for where in (listed, help_text):
        units = set(re.findall(r"\b([KMGT]i?B|B)\b", where))
        assert units == {u for u in ("B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB")}, (where, units)
        assert {u.lower() for u in units} <= set(_UNITS)
        assert parse_size("1TiB") == 2 ** 40 and parse_size("1TB") == 10 ** 12


def test_the_documented_exit_statuses_are_the_real_ones(monkeypatch):
    """docs/configuration.md's table: 1 for a Plexus error, 2 for a usage error, 130 for Ctrl-C,
    0 for success, each produced by the code that decides it."""
    from click.testing import CliRunner

    from plexus.engine.runtime import run_guarded
    from plexus.errors import PlexusError

    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    table = text[text.index("## Exit status"):]
    documented = {int(c) for c in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert documented == {0, 1, 2, 130}, documented

    def status(body) -> int:
        with pytest.raises(SystemExit) as e:
            run_guarded(body, lambda: None)
        return e.value.code

    def fail(exc):
        def body():
            raise exc
        return body

    assert status(lambda: 0) == 0
    assert status(fail(PlexusError("bad checkpoint"))) == 1
    assert status(fail(KeyboardInterrupt())) == 130
    assert CliRunner().invoke(cli.main, ["generate", "--no-such-option"]).exit_code == 2


@pytest.mark.timeout(180)
def test_the_readme_mpirun_line_runs_as_written(demo_tiny, tmp_path):
    """README's first command line (its model swapped for the demo model), with only the
    environment the README tells a user to set: as root, its export line. And the README's
    word on --oversubscribe: more ranks than cores need it, and say why without it."""
    import os
    import subprocess
    import sys

    from tests.helpers import mpi_env

    readme = (REPO_ROOT / "README.md").read_text()
    line = next(ln for ln in fenced_lines(readme) if ln.startswith("mpirun ") and "plexus generate" in ln)
    (model,) = re.findall(r"--model (\S+)", line)
    argv = words(line.replace(model, str(demo_tiny)))
    assert "--bind-to" in argv, line
    env = {k: v for k, v in mpi_env().items() if not k.startswith("OMPI_ALLOW")}
    if os.geteuid() == 0:
        exports = re.search(r"`export (OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)`", readme)
        assert exports, "the README does not say what root must set"
        env.update(kv.split("=") for kv in exports.group(1).split())
    argv[0] = str(Path(sys.executable).parent / "mpirun")
    r = subprocess.run(argv + ["--max-tokens", "4"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "2 rank(s)" in r.stderr, r.stderr

    one_slot = tmp_path / "hostfile"  # a box of one core, whatever this machine has
    one_slot.write_text("localhost slots=1\n")
    more = [argv[0], "-n", "2", "--hostfile", str(one_slot), "--bind-to", "none", "python", "-c", "pass"]
    refused = subprocess.run(more, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not enough slots" in refused.stdout + refused.stderr
    assert '"not enough slots"' in readme
    ran = subprocess.run(more[:5] + ["--oversubscribe"] + more[5:], env=env, capture_output=True, text=True,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr
