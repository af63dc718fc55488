"""A number no array can hold, given to an integer list flag, is one line naming the flag (it
ended in an OverflowError traceback)."""

from __future__ import annotations

import sys

import pytest

from experiments import _cli
from training_util import one_line_error, run_module, subprocess_env

HUGE = "99999999999999999999"


@pytest.mark.parametrize("value, expected", [
    (HUGE, f"--tokens={HUGE}: {HUGE} is too large; every value must be <= 2147483647."),
    (f"1,-{HUGE}", f"--tokens=1,-{HUGE}: every value must be >= -2147483648."),
    ("2147483648", "--tokens=2147483648: 2147483648 is too large; every value must be <= "
                   "2147483647."),
])
def test_integer_lists_refuse_values_beyond_int32_naming_the_flag(value, expected):
  with pytest.raises(_cli.UsageError) as error:
    _cli.integers("tokens", value)
  assert str(error.value) == expected
  assert _cli.integers("tokens", "0,2147483647,-2147483648") == [0, 2**31 - 1, -2**31]


@pytest.mark.slow
@pytest.mark.parametrize("command, flag", [("score", "tokens"), ("generate", "prompt_tokens")])
def test_a_huge_token_id_on_the_command_line_is_one_line(full_run, command, flag):
  result = run_module([sys.executable, "-m", f"experiments.{command}",
                       f"--checkpoint={full_run / 'export'}", f"--{flag}=1,{HUGE}"],
                      subprocess_env(devices=1))

  assert one_line_error(result) == (f"error: --{flag}=1,{HUGE}: {HUGE} is too large; every "
                                    f"value must be <= 2147483647.")
