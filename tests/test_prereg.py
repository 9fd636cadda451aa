"""Decision rules, verdicts and the preregistration record, checked against known answers:
each branch of a rule at and around its thresholds (strictness as written), the mirror
symmetry, equivalence margins, ceilings and floors, multi-part combination, the rendered text,
and the record's append-only history with its provenance."""

import json

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from toymesa import prereg

ABOVE = {"confirm": "low > 0", "refute": "high < 0"}
LEVEL = {"confirm": "low > 0.5", "refute": "high <= 0.5"}


def part(low, high, *arms, est=None):
    est = (low + high) / 2 if est is None else est
    return prereg.Part("p", (est, low, high), tuple(prereg.arm(f"a{i}", v) for i, v in enumerate(arms)))


# ------------------------------------------------------------------ rules
@pytest.mark.parametrize(
    "rule, low, high, expected",
    [
        (ABOVE, 0.1, 2.0, "confirmed"),
        (ABOVE, 0.0, 2.0, "inconclusive"),  # "low > 0": touching 0 does not confirm
        (ABOVE, -1.0, 0.0, "inconclusive"),  # "high < 0": touching 0 does not refute (H11's old bug)
        (ABOVE, 0.0, 0.0, "inconclusive"),
        (ABOVE, -2.0, -0.1, "refuted"),
        (ABOVE, -1.0, 1.0, "inconclusive"),
        (LEVEL, 0.5, 0.9, "inconclusive"),
        (LEVEL, 0.2, 0.5, "refuted"),  # "high <= 0.5" is written non-strict: touching refutes
        (LEVEL, 0.51, 0.9, "confirmed"),
        ({"confirm": "high < 0.02", "refute": "low > 0.02"}, 0.0, 0.02, "inconclusive"),
        ({"confirm": "high < 0.02", "refute": "low > 0.02"}, 0.0, 0.0199, "confirmed"),
        ({"confirm": "high < 0.02", "refute": "low >= 0.02"}, 0.02, 0.5, "refuted"),
        ({"equivalence": 0.1}, -0.1, 0.1, "confirmed"),  # inside, closed
        ({"equivalence": 0.1}, -0.05, 0.11, "inconclusive"),
        ({"equivalence": 0.1}, 0.1, 0.4, "inconclusive"),  # touches the margin: not entirely outside
        ({"equivalence": 0.1}, 0.2, 0.4, "refuted"),
        ({"equivalence": 0.1}, -0.4, -0.11, "refuted"),
        (ABOVE, np.nan, 1.0, "inconclusive"),
        ({"equivalence": 0.1}, 0.0, np.nan, "inconclusive"),
    ],
)
def test_rule_calls_follow_the_written_conditions(rule, low, high, expected):
    assert prereg.parse_rule(rule).call(low, high) == expected
    assert prereg.judge(rule, [part(low, high)])[0] == expected


@given(low=st.floats(-10, 10), width=st.floats(0, 10), t=st.floats(-10, 10), strict_confirm=st.booleans())
def test_rule_mirrors_under_negation(low, width, t, strict_confirm):
    # exactly one of the two conditions may include the threshold, or a point CI at t would do both
    (c_gt, c_lt), (r_gt, r_lt) = ((">", "<"), (">=", "<=")) if strict_confirm else ((">=", "<="), (">", "<"))
    above = prereg.parse_rule({"confirm": f"low {c_gt} {t!r}", "refute": f"high {r_lt} {t!r}"})
    below = prereg.parse_rule({"confirm": f"high {c_lt} {-t!r}", "refute": f"low {r_gt} {-t!r}"})
    high = low + width
    assert above.call(low, high) == below.call(-high, -low)


def test_a_rule_where_a_point_ci_would_confirm_and_refute_is_refused():
    with pytest.raises(prereg.RuleError, match="both confirm"):
        prereg.parse_rule({"confirm": "low >= 0", "refute": "high <= 0"})


@given(low=st.floats(-3, 3), width=st.floats(0, 3))
def test_confirm_and_refute_never_both_hold(low, width):
    for raw in (ABOVE, LEVEL, {"equivalence": 0.5}):
        call = prereg.parse_rule(raw).call(low, low + width)
        assert call in ("confirmed", "refuted", "inconclusive")


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"confirm": "low > 0"}, r"rule\.refute is missing"),
        ({"confirm": "low > 0", "refute": "high < 1"}, r"both confirm .* and refute"),
        ({"confirm": "mean > 0", "refute": "high < 0"}, r"rule\.confirm='mean > 0' is invalid"),
        ({"confirm": "low > zero", "refute": "high < 0"}, r"rule\.confirm"),
        ({"equivalence": -0.1}, r"rule\.equivalence=-0\.1 is invalid"),
        ({"equivalence": float("inf")}, r"rule\.equivalence=inf is invalid"),
        ({"equivalence": True}, r"rule\.equivalence=True is invalid"),
        ({"equivalence": 0.1, "confirm": "low > 0"}, r"either equivalence"),
        ({"confirm": "low > 0", "refute": "high < 0", "combine": "any"}, r"rule\.combine='any' is invalid"),
        ({"confirm": "low > 0", "refute": "high < 0", "strict": True}, r"rule\.strict is unknown"),
        ("low > 0", r"give a table"),
    ],
)
def test_bad_rules_are_named(raw, match):
    with pytest.raises(prereg.RuleError, match=match):
        prereg.parse_rule(raw)


def test_rendered_text_states_the_conditions_as_evaluated():
    assert prereg.render(ABOVE, comparison=False) == "confirmed if CI low > 0; refuted if CI high < 0; otherwise inconclusive"
    assert "CI high <= 0.5" in prereg.render(LEVEL)
    assert "inside [-0.1, 0.1]" in prereg.render({"equivalence": 0.1})
    assert "every arm at 0 or every arm at 1 cannot discriminate" in prereg.render(ABOVE)
    several = prereg.render(ABOVE | {"combine": "all_none_refutes"}, parts=3)
    assert "none confirming" in several and "per part" in several


# ------------------------------------------------------------------ verdicts
def test_a_comparison_with_every_arm_at_the_ceiling_cannot_discriminate():
    ones = np.ones(10)
    assert prereg.judge(ABOVE, [part(0.0, 0.0, ones, ones)])[0] == "at ceiling: cannot discriminate"
    assert prereg.judge(ABOVE, [part(0.0, 0.0, np.zeros(10), np.zeros(10))])[0] == "at floor: cannot discriminate"
    # equivalence cannot be confirmed from two arms stuck at the same bound either
    assert prereg.judge({"equivalence": 0.1}, [part(0.0, 0.0, ones, ones)])[0] == "at ceiling: cannot discriminate"
    # one arm at 1, the other at 0: the largest possible difference, decided
    assert prereg.judge(ABOVE, [part(1.0, 1.0, ones, np.zeros(10))])[0] == "confirmed"
    # a level (one arm) at the ceiling is decided by its threshold
    assert prereg.judge(LEVEL, [part(1.0, 1.0, ones)])[0] == "confirmed"
    # one seed off the ceiling: decided by the CI again
    almost = np.r_[np.ones(9), 0.9]
    assert prereg.judge(ABOVE, [part(0.0, 0.02, ones, almost)])[0] == "inconclusive"


def test_several_parts_combine_as_the_rule_says():
    conf, refu, inco = part(0.1, 0.2), part(-0.2, -0.1), part(-0.1, 0.1)
    all_rule, strict = ABOVE | {"combine": "all"}, ABOVE | {"combine": "all_none_refutes"}
    assert prereg.judge(all_rule, [conf, conf, conf])[0] == "confirmed"
    assert prereg.judge(all_rule, [conf, conf, inco])[0] == "inconclusive"
    assert prereg.judge(all_rule, [conf, refu, conf])[0] == "refuted"
    assert prereg.judge(all_rule, [inco, inco])[0] == "inconclusive"
    assert prereg.judge(strict, [inco, inco])[0] == "refuted"  # none confirms
    assert prereg.judge(strict, [conf, inco])[0] == "inconclusive"
    pinned = part(0.0, 0.0, np.ones(4), np.ones(4))
    assert prereg.judge(all_rule, [conf, pinned])[0] == "at ceiling: cannot discriminate"
    assert prereg.judge(all_rule, [refu, pinned])[0] == "refuted"
    verdict, evidence = prereg.judge(all_rule, [conf, refu])
    assert evidence.count("->") == 2 and "-> refuted" in evidence


def test_non_finite_members_are_excluded_and_counted():
    a = prereg.arm("a", [1.0, np.nan, 1.0, 0.0], nonfinite=[False, False, True, False])
    assert a.values.tolist() == [1.0, 0.0] and a.nonfinite == 2  # the flagged one and the NaN
    verdict, evidence = prereg.judge(ABOVE, [prereg.Part("d", (0.5, 0.1, 0.9), (a, prereg.arm("b", [0.0, 0.0])))])
    assert verdict == "confirmed [2 non-finite members excluded]"
    assert "a n=2 +2 non-finite" in evidence


def test_verdict_table_judges_each_hypothesis_by_its_own_rule():
    hs = [
        {"id": "A", "statement": "s", "prediction": "p", "rule": ABOVE},
        {"id": "B", "statement": "s", "prediction": "p", "rule": {"confirm": "high < 0", "refute": "low > 0"}},
        {"id": "C", "statement": "s", "prediction": "p"},
    ]
    same = [part(0.1, 0.3)]
    t = prereg.verdict_table(hs, {"A": same, "B": same, "C": same})
    assert t["verdict"].tolist() == ["confirmed", "refuted", "not evaluated"]
    assert t["rule"][0].startswith("confirmed if CI low > 0;")


# ------------------------------------------------------------------ preregistration
H1 = {"id": "h1", "statement": "Loss falls with depth.", "prediction": "loss_gap > 0", "metric": "loss"}
H2 = {"id": "h2", "statement": "Accuracy saturates.", "prediction": "acc > 0.9"}
EDITED = H1 | {"prediction": "loss_gap > 0.1"}


def _file(path):
    return json.loads(path.read_text())


@given(text=st.text(max_size=20), other=st.text(max_size=20))
def test_digest_changes_with_any_text_edit(text, other):
    assume(text != other)
    assert prereg.hypothesis_digest(H1 | {"prediction": text}) != prereg.hypothesis_digest(H1 | {"prediction": other})


def test_digest_ignores_key_order_and_unknown_keys_but_not_missing_ones():
    d = prereg.hypothesis_digest(H1)
    assert len(d) == 12 and int(d, 16) >= 0
    assert prereg.hypothesis_digest(dict(reversed(H1.items())) | {"notes": "x"}) == d
    assert prereg.hypothesis_digest({k: v for k, v in H1.items() if k != "metric"}) != d
    assert prereg.hypothesis_digest(H1 | {"statement": H1["statement"] + " "}) != d


def test_reregistering_unchanged_hypotheses_amends_nothing(tmp_path):
    path = tmp_path / "prereg.json"
    first = prereg.register(path, [H1, H2], results_exist=False, now="t0")
    again = prereg.register(path, [H2, H1], results_exist=True, now="t1")
    assert again == first == _file(path) and first["amendments"] == []
    assert prereg.registration_status(again) == {"h1": "as registered", "h2": "as registered"}
    assert [p.name for p in tmp_path.iterdir()] == ["prereg.json"]  # no temp file left behind


def test_edit_before_results_is_an_amendment(tmp_path):
    path = tmp_path / "prereg.json"
    prereg.register(path, [H1, H2], results_exist=False, now="t0")
    rec = prereg.register(path, [EDITED, H2], results_exist=False, now="t1")
    (a,) = rec["amendments"]
    assert (a["id"], a["kind"], a["at"], a["results_existed"]) == ("h1", "edited", "t1", False)
    assert a["old"]["prediction"] == H1["prediction"] and a["new"]["digest"] == prereg.hypothesis_digest(EDITED)
    assert prereg.registration_status(rec) == {"h1": "amended before results", "h2": "as registered"}


def test_edit_after_results_is_flagged_and_original_is_kept(tmp_path):
    path = tmp_path / "prereg.json"
    prereg.register(path, [H1, H2], results_exist=False, now="t0")
    prereg.register(path, [EDITED, H2], results_exist=True, now="t1")
    rec = prereg.register(path, [EDITED | {"prediction": "loss_gap > 0.2"}, H2], results_exist=False, now="t2")
    assert prereg.registration_status(rec)["h1"] == "EDITED AFTER RESULTS"
    assert prereg.original(rec, "h1") == H1 | {"digest": prereg.hypothesis_digest(H1)}
    with pytest.raises(KeyError, match="h9"):
        prereg.original(rec, "h9")


def test_history_is_append_only_and_valid_json_after_every_call(tmp_path):
    path = tmp_path / "prereg.json"
    H3 = {"id": "h3", "statement": "Width helps.", "prediction": "acc_gap > 0"}
    calls = [([H1, H2], False), ([EDITED, H2], False), ([EDITED, H2, H3], False), ([EDITED, H3], True), ([H1, H3], True), ([H1, H3], True)]
    before = None
    for t, (hs, results) in enumerate(calls):
        prereg.register(path, hs, results_exist=results, now=f"t{t}")
        now = _file(path)  # parses: the file is whole JSON after each call
        if before is not None:
            assert {k: v for k, v in now.items() if k != "amendments"} == {k: v for k, v in before.items() if k != "amendments"}
            assert now["amendments"][: len(before["amendments"])] == before["amendments"]
        before = now
    assert [(a["id"], a["kind"]) for a in before["amendments"]] == [("h1", "edited"), ("h3", "added"), ("h2", "removed"), ("h1", "edited")]
    assert prereg.registration_status(before) == {"h1": "EDITED AFTER RESULTS", "h2": "REMOVED AFTER RESULTS", "h3": "amended before results"}
    assert prereg.original(before, "h3") == H3 | {"digest": prereg.hypothesis_digest(H3)}


def test_added_and_removed_hypotheses_are_flagged(tmp_path):
    H3 = {"id": "h3", "statement": "Width helps.", "prediction": "acc_gap > 0"}
    prereg.register(tmp_path / "a.json", [H1, H2], results_exist=False)
    rec = prereg.register(tmp_path / "a.json", [H1, H3], results_exist=True)
    assert prereg.registration_status(rec) == {"h1": "as registered", "h2": "REMOVED AFTER RESULTS", "h3": "ADDED AFTER RESULTS"}
    prereg.register(tmp_path / "b.json", [H1, H2], results_exist=False)
    rec = prereg.register(tmp_path / "b.json", [H1], results_exist=False)
    assert prereg.registration_status(rec)["h2"] == "removed before results"
    rec = prereg.register(tmp_path / "b.json", [H1, H2], results_exist=True)  # back again, now with results in hand
    assert prereg.registration_status(rec)["h2"] == "EDITED AFTER RESULTS"


def test_registering_after_results_is_flagged_and_ids_must_be_unique(tmp_path):
    rec = prereg.register(tmp_path / "late.json", [H1], results_exist=True)
    assert prereg.registration_status(rec) == {"h1": "REGISTERED AFTER RESULTS"}
    with pytest.raises(ValueError, match="unique.*h1"):
        prereg.register(tmp_path / "dup.json", [H1, EDITED], results_exist=False)


def test_the_record_keeps_provenance_and_sees_analysis_changes(tmp_path):
    path = tmp_path / "prereg.json"
    prov = {"git_commit": "abc", "spec_digest": "s1", "analysis_digest": "a1", "results_elsewhere": []}
    rec = prereg.register(path, [H1], results_exist=False, now="t0", provenance=prov)
    assert rec["provenance"] == prov and rec["analyses"] == [{"digest": "a1", "at": "t0", "results_existed": False}]
    assert prereg.analysis_status(rec, "a1") == "as registered"
    rec = prereg.register(path, [H1], results_exist=False, now="t1", provenance=prov | {"analysis_digest": "a2"})
    assert prereg.analysis_status(rec, "a2") == "as registered"  # changed before any result
    rec = prereg.register(path, [H1], results_exist=True, now="t2", provenance=prov | {"analysis_digest": "a3"})
    assert prereg.analysis_status(rec, "a3") == "ANALYSIS CHANGED AFTER RESULTS"
    assert prereg.analysis_status(rec, "zz") == "ANALYSIS CHANGED AFTER RESULTS"  # never registered
    assert prereg.analysis_status(rec, "a1") == "as registered"  # going back to the registered code
    assert [a["digest"] for a in rec["analyses"]] == ["a1", "a2", "a3"]
    again = prereg.register(path, [H1], results_exist=True, now="t3", provenance=prov | {"analysis_digest": "a3"})
    assert again == rec  # nothing new: nothing appended
    assert prereg.analysis_status({"hypotheses": []}, "a1") == "not recorded"


def test_a_rule_is_part_of_the_registered_version():
    ruled = H1 | {"rule": ABOVE}
    assert prereg.hypothesis_digest(ruled) != prereg.hypothesis_digest(H1)
    assert prereg.hypothesis_digest(H1 | {"rule": {"confirm": "low > 0", "refute": "high <= 0"}}) != prereg.hypothesis_digest(ruled)
