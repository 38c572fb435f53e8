"""Policy files: versioned TOML, validated with clear errors, written so they read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynasorctl.calibration.policyfile import dump_policy_file, read_policy_file
from dynasorctl.errors import UserError
from proxy.core.policy import (
    FEATURES,
    CotPolicy,
    PolicyFile,
    PolicyFileError,
    ScPolicy,
    StopRule,
    load_policy_file,
    parse_policy_file,
    select_policy,
)


def test_round_trip_cot_with_rule() -> None:
    rule = StopRule(features=FEATURES, weights=tuple(0.1 * i - 0.3 for i in range(8)),
                    bias=-1.25, threshold=0.9)
    pf = PolicyFile(kind="cot", model='odd "name"\\',
                    cot=CotPolicy(interval=128, early_interval=512, dense_from=4096, window=8,
                                  agree_share=0.75, hesitation="veto", max_probes=100, rule=rule),
                    provenance={"seed": 3, "net": 0.25, "note": "é\n", "ok": True})
    assert parse_policy_file(dump_policy_file(pf)) == pf


def test_round_trip_sc() -> None:
    pf = PolicyFile(kind="sc", model="m", sc=ScPolicy(threshold=0.7, check_tokens=512))
    text = dump_policy_file(pf)
    assert "# stop adding samples once the rule's measure >= threshold" in text
    assert parse_policy_file(text) == pf


def test_defaults_fill_absent_fields() -> None:
    pf = parse_policy_file('version = 1\nkind = "cot"\n[cot]\nwindow = 32\n')
    assert pf.model == "*" and pf.cot == CotPolicy(window=32)


@pytest.mark.parametrize(("text", "message"), [
    ("version = ", "not valid TOML"),
    ('kind = "cot"\n[cot]\n', "version None is not supported"),
    ('version = 3\nkind = "cot"\n[cot]\n', "version 3 is not supported"),
    ('version = 1\nkind = "cot"\n[cot]\nthink_end = true\n', "set version = 2"),
    ('version = 2\nkind = "cot"\n[cot]\nperiodic = false\n', "could never stop"),
    ('version = 2\nkind = "cot"\n[cot.transition]\nmin_confidence = 1.5\n',
     "cot.transition.min_confidence"),
    ('version = 2\nkind = "cot"\n[cot.transition]\nagree = 2\n', "go together"),
    (('version = 2\nkind = "cot"\n[cot.transition]\nmin_confidence = 0.9\n'
      '[cot.transition.probe]\nlogprobs = false\n'), "needs probe.logprobs"),
    ('version = 2\nkind = "sc"\n[sc]\nrule = "dirichlet"\n', "sc.rule"),
    ('version = 1\nkind = "cot"\n[cot]\nwindow = 0\n', "cot.window"),
    ('version = 1\nkind = "cot"\n[cot]\nwindwo = 3\n', "cot.windwo"),
    ('version = 1\nkind = "cot"\n[sc]\n', 'kind = "cot" needs a [cot] table'),
    ('version = 1\nkind = "xx"\n[cot]\n', "kind"),
    ('version = 1\nkind = "cot"\n[cot.rule]\nfeatures = ["nope"]\nweights = [1.0]\n',
     "cot.rule.features"),
    ('version = 1\nkind = "cot"\n[cot.rule]\nfeatures = ["position"]\nweights = []\n',
     "1 features but 0 weights"),
])
def test_invalid_files_say_why(text: str, message: str) -> None:
    with pytest.raises(PolicyFileError, match="policy") as err:
        parse_policy_file(text)
    assert message in str(err.value)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="no such policy file"):
        load_policy_file(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="no such policy file"):
        read_policy_file(tmp_path / "nope.toml")


def test_scope_by_model() -> None:
    everyone = PolicyFile(kind="cot", cot=CotPolicy())
    qwen = PolicyFile(kind="cot", model="Qwen/Qwen3-8B", cot=CotPolicy(window=32))
    assert select_policy([everyone, qwen], "Qwen/Qwen3-8B") is qwen
    assert select_policy([everyone, qwen], "other") is everyone
    assert select_policy([qwen], "other") is None
    assert qwen.applies_to("Qwen/Qwen3-8B") and not qwen.applies_to(None)
