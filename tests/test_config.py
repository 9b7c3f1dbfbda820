"""``--config plexus.yaml``: the file sets options, flags override it, mistakes name the key.

The fast tests drive the real click commands with CliRunner and stop before any model work
(``run_generate`` and ``start`` are replaced by recorders); one test runs the real thing.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from plexus.commands import generate as generate_command
from plexus.commands import main as cli
from plexus.commands.config_file import config_option, option_keys
from tests.helpers import plexus_cmd, run


@pytest.fixture
def generate_args(monkeypatch):
    """Run ``plexus generate ...`` through click and return the values it would run with."""
    import plexus.engine.runtime

    seen = {}

    class FakeRuntime:
        comm = None

    def fake_start(device, threads, verbose):
        seen.update(device=device, threads=threads, verbose=verbose)
        return FakeRuntime()

    def fake_run_generate(rt, model, prompt, prompts_file, chat, params, dtype, max_context, as_json, output,
                          *more, **more_kw):
        seen.update(model=model, prompt=prompt, prompts_file=prompts_file, chat=chat, params=params, dtype=dtype,
                    max_context=max_context, as_json=as_json, output=output)
        return 0

    monkeypatch.setattr(plexus.engine.runtime, "start", fake_start)
    monkeypatch.setattr(generate_command, "run_generate", fake_run_generate)

    def invoke(*args, env=None):
        seen.clear()
        result = CliRunner().invoke(cli.main, ["generate", *map(str, args)], env=env)
        return result, dict(seen)

    return invoke


def write(tmp_path: Path, text: str, name: str = "plexus.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_config_sets_every_kind_of_option(generate_args, tmp_path):
    cfg = write(tmp_path, """\
        model: /models/m
        dtype: bfloat16
        device: cpu
        threads: 3
        max-context: 256        # dashes...
        max_tokens: 7           # ...or underscores
        temperature: 0.5
        top-p: 0.9
        top_k: 40
        seed: 11
        stop: ["\\n\\n", "END"]
        json: true              # the flag's name, though click calls it as_json
        verbose: yes
        prompt: hello
        """)
    result, seen = generate_args("--config", cfg)
    assert result.exit_code == 0, result.output
    p = seen["params"]
    assert (seen["model"], seen["dtype"], seen["device"], seen["threads"], seen["max_context"]) == \
        ("/models/m", "bfloat16", "cpu", 3, 256)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, tuple(p.stop)) == \
        (7, 0.5, 0.9, 40, 11, ("\n\n", "END"))
    assert seen["as_json"] is True and seen["verbose"] is True and seen["prompt"] == "hello"


def test_defaults_without_config(generate_args):
    result, seen = generate_args("--prompt", "hi")
    assert result.exit_code == 0, result.output
    assert seen["params"].max_tokens == 128 and seen["as_json"] is False and seen["device"] == "auto"


def test_flags_override_the_file(generate_args, tmp_path):
    cfg = write(tmp_path, "max-tokens: 7\ndevice: cpu\nstop: END\nprompt: from-file\n")
    result, seen = generate_args("--max-tokens", "3", "--config", cfg, "--prompt", "from-flag")
    assert result.exit_code == 0, result.output
    assert seen["params"].max_tokens == 3  # given before --config on the line: still wins
    assert seen["prompt"] == "from-flag"
    assert seen["device"] == "cpu"  # not given on the line: from the file
    assert tuple(seen["params"].stop) == ("END",)  # a single value for a repeatable option


def test_command_section_wins_over_top_level(generate_args, tmp_path):
    cfg = write(tmp_path, """\
        max-tokens: 5
        device: cpu
        generate:
          max-tokens: 9
        serve:                  # another command's section: not read by generate
          port: 8123
          no-such-option: 1
        pool:                   # plexus plan's section: not read by generate
          tower: [cuda:0=24GiB, cuda:1=24GiB]
        """)
    result, seen = generate_args("--config", cfg, "--prompt", "x")
    assert result.exit_code == 0, result.output
    assert seen["params"].max_tokens == 9 and seen["device"] == "cpu"


def test_config_from_environment(generate_args, tmp_path):
    cfg = write(tmp_path, "max-tokens: 4\n")
    result, seen = generate_args("--prompt", "x", env={"PLEXUS_CONFIG": str(cfg)})
    assert result.exit_code == 0, result.output
    assert seen["params"].max_tokens == 4


def test_null_means_the_default(generate_args, tmp_path):
    cfg = write(tmp_path, "max-tokens:\nseed: ~\n")
    result, seen = generate_args("--config", cfg, "--prompt", "x")
    assert result.exit_code == 0, result.output
    assert seen["params"].max_tokens == 128 and seen["params"].seed is None


@pytest.mark.parametrize("text, needles", [
    ("max_tokenz: 3\n", ["unknown key 'max_tokenz'", "plexus generate", "did you mean 'max-tokens'"]),
    ("generate:\n  colour: red\n", ["unknown key 'generate.colour'"]),
    ("workers: 4\n", ["unknown key 'workers'", "section"]),  # e.g. a serve option at the top level
    ("config: other.yaml\n", ["unknown key 'config'"]),
    ("max-tokens: many\n", ["key 'max-tokens'", "many"]),
    ("top-p: 1.5\n", ["key 'top-p'", "1.5"]),
    ("dtype: float8\n", ["key 'dtype'", "float8"]),
    ("max-tokens: 3\nmax_tokens: 4\n", ["'max_tokens' sets the same option as 'max-tokens'"]),
    ("generate: 3\n", ["section 'generate' must be a mapping"]),
    ("- model\n- tiny\n", ["expected a mapping", "list"]),
    ("model: [unclosed\n", ["not valid YAML", "line 2"]),
    ("model: x\n\tdevice: cpu\n", ["not valid YAML"]),
])
def test_config_errors_name_the_file_and_key(generate_args, tmp_path, text, needles):
    cfg = write(tmp_path, text)
    result, seen = generate_args("--config", cfg, "--prompt", "x")
    assert result.exit_code == 2, result.output
    assert not seen, "the command ran despite a bad config file"
    error = [line for line in result.output.splitlines() if line.startswith("plexus: error:")]
    assert len(error) == 1, result.output
    assert str(cfg) in error[0]
    for needle in needles:
        assert needle in error[0], error[0]
    assert "Traceback" not in result.output


def test_missing_config_file(generate_args, tmp_path):
    result, seen = generate_args("--config", tmp_path / "nope.yaml", "--prompt", "x")
    assert result.exit_code == 2 and not seen
    assert f"config file {tmp_path / 'nope.yaml'} does not exist" in result.output


def test_empty_config_file_is_fine(generate_args, tmp_path):
    result, seen = generate_args("--config", write(tmp_path, "# nothing yet\n"), "--prompt", "x")
    assert result.exit_code == 0, result.output
    assert seen["params"].max_tokens == 128


def test_option_on_any_command(tmp_path):
    # The mechanism is generic: any click command with config_option checks against its own options.
    @click.command("toy")
    @click.option("--alpha-beta", type=int, default=1)
    @click.option("--flag/--no-flag", default=False)
    @config_option
    def toy(alpha_beta, flag):
        click.echo(f"{alpha_beta} {flag}")

    assert set(option_keys(toy)) == {"alpha_beta", "flag"}
    c = write(tmp_path, "alpha-beta: 5\nflag: true\n", "c.yaml")
    assert CliRunner().invoke(toy, ["--config", str(c)]).output == "5 True\n"
    assert CliRunner().invoke(toy, ["--config", str(c), "--no-flag"]).output == "5 False\n"
    d = write(tmp_path, "alpha: 5\n", "d.yaml")
    assert "unknown key 'alpha' for 'plexus toy'" in CliRunner().invoke(toy, ["--config", str(d)]).output


@pytest.mark.parametrize("command", ["serve", "bench"])
def test_serve_and_bench_take_config(command, tmp_path):
    # serve and bench share common_engine_options; a bad key stops them before they start.
    try:
        cmd = cli.main.get_command(click.Context(cli.main), command)
    except ImportError as e:
        pytest.skip(f"plexus {command} is not there yet ({e})")
    assert any(p.name == "config" for p in cmd.params)
    cfg = write(tmp_path, "no-such-option: 1\n")
    result = CliRunner().invoke(cli.main, [command, "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert f"unknown key 'no-such-option' for 'plexus {command}'" in result.output
    # and every one of its options is a valid key
    assert set(option_keys(cmd)) >= {p.name for p in cmd.params if p.name not in ("config", "help")}


@pytest.mark.timeout(120)
def test_real_run_with_config(demo_tiny, tmp_path):
    # One real generate: options from the file plus a flag override give the same JSON as flags only.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Once upon a time"}\n{"prompt": "The cat"}\n')
    cfg = write(tmp_path, f"""\
        model: {demo_tiny}
        prompts-file: {prompts}
        max-tokens: 50
        json: true
        device: cpu
        """)
    by_config = run(plexus_cmd("generate", "--config", cfg, "--max-tokens", "6"), timeout=90)
    assert by_config.rc == 0, by_config.describe()
    by_flags = run(plexus_cmd("generate", "--model", demo_tiny, "--prompts-file", prompts, "--max-tokens", "6",
                              "--json", "--device", "cpu"), timeout=90)
    assert by_flags.rc == 0, by_flags.describe()
    records = by_config.json_lines()
    assert [r["prompt"] for r in records] == ["Once upon a time", "The cat"]
    assert all(len(r["token_ids"]) <= 6 for r in records)
    assert records == by_flags.json_lines()
    assert json.dumps(records)  # plain JSON lines on stdout, logs on stderr


def test_docs_example(generate_args, tmp_path):
    # The example in docs/configuration.md is a valid file for generate, and does what the doc says.
    from tests.helpers import REPO_ROOT

    doc = (REPO_ROOT / "docs/configuration.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = write(tmp_path, example)
    result, seen = generate_args("--config", cfg, "--prompts-file", "prompts.jsonl", "--max-tokens", "32")
    assert result.exit_code == 0, result.output
    assert seen["model"] == "/srv/models/Qwen2.5-7B-Instruct" and seen["dtype"] == "bfloat16"
    assert seen["max_context"] == 8192 and seen["as_json"] is True
    assert seen["params"].max_tokens == 32 and seen["params"].temperature == 0.0
    # and for the other commands that take it: --config is read (and checked) before --help exits
    for command in ("serve", "bench"):
        try:
            cli.main.get_command(click.Context(cli.main), command)
        except ImportError:
            continue
        result = CliRunner().invoke(cli.main, [command, "--config", str(cfg), "--help"])
        assert result.exit_code == 0, result.output
