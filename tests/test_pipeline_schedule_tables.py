"""Schedule tables (sharding/schedules.py, pure Python): bubbles and in-flight activations
computed from the tables against the DualPipe paper's table, and the tables' dependencies.

The paper's table (DeepSeek-AI, DualPipe README; F a forward chunk, B a full backward chunk,
W its weight half, F&B an overlapped pair, PP stages): 1F1B bubble (PP-1)(F+B), activations
PP; ZB1P (PP-1)(F+B-2W), PP; DualPipeV (PP stages on PP/2 devices) (PP/2-1)(F&B+B-3W), PP+1
(in stages' units, here a chunk), parameters 2x per device.
"""

import pytest

from sharding.schedule_program import COL, compile_program
from sharding.schedules import (Action, Costs, Schedule, ScheduleError, for_mesh, make_schedule,
                                main)

SIZES = [(2, 4), (2, 8), (3, 6), (4, 8), (4, 16), (8, 16)]
# costs with the input-gradient half equal to a forward (B - W = F), as the paper's figures
COSTS = [Costs(1, 2, 1), Costs(1, 2, 1, FB=2.5), Costs(2, 3, 1, FB=4), Costs(1.5, 2.5, 1, FB=3)]


@pytest.mark.parametrize("P,M", SIZES)
@pytest.mark.parametrize("costs", COSTS + [Costs(1, 3, 1), Costs(1, 2, 0.5)])
def test_1f1b_and_zb_bubbles_and_activations_match_the_paper(P, M, costs):
    f, b, w = costs.F, costs.B, costs.W
    one = make_schedule("1f1b", P, M)
    assert one.bubble(costs) == pytest.approx([(P - 1) * (f + b)] * P)
    assert one.peak_activations() == [P - s for s in range(P)]       # at most P, stage 0
    zb = make_schedule("zb", P, M)
    assert zb.bubble(costs) == pytest.approx([(P - 1) * (f + b - 2 * w)] * P)
    assert zb.peak_activations() == [P] * P
    gp = make_schedule("gpipe", P, M)
    assert gp.bubble(costs) == pytest.approx([(P - 1) * (f + b)] * P)
    assert gp.peak_activations() == [M] * P
    assert gp.bubble_fraction() == pytest.approx((P - 1) / (M + P - 1))


@pytest.mark.parametrize("P,M", SIZES)
@pytest.mark.parametrize("costs", COSTS)
def test_dualpipev_bubble_and_activations_match_the_paper(P, M, costs):
    """P devices hold PP = 2P stages: bubble (PP/2 - 1)(F&B + B - 3W) on the slowest device,
    PP + 1 chunks' activations on every device."""
    sched = make_schedule("dualpipev", P, M)
    fb = costs.FB if costs.FB is not None else costs.F + costs.B
    assert max(sched.bubble(costs)) == pytest.approx((P - 1) * (fb + costs.B - 3 * costs.W))
    assert sched.peak_activations() == [2 * P + 1] * P
    assert sched.chunks == 2 and sched.virtual_stages == 2 * P


def test_dualpipev_shape():
    """Micro-batches enter and leave (the loss) at device 0, turn at the last device, and
    forward of one chunk is paired with the backward of the other in one tick."""
    P, M = 4, 8
    sched = make_schedule("dualpipev", P, M)
    assert sched.place(0) == (0, 0) and sched.place(2 * P - 1) == (0, 1)
    assert sched.place(P - 1) == (P - 1, 0) and sched.place(P) == (P - 1, 1)
    pairs = [c for row in sched.by_tick for c in row if len(c) == 2]
    assert pairs and all({a.kind for a in c} == {"F", "BW"} and c[0].chunk != c[1].chunk
                         for c in pairs)
    assert any(a.kind == "W" for a in sched.actions)          # some weight halves deferred
    with pytest.raises(ScheduleError, match="at least 2 x 4 stages = 8 micro-batches"):
        make_schedule("dualpipev", 4, 6)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb", "dualpipev"])
@pytest.mark.parametrize("P,M", SIZES)
def test_tables_are_valid_and_complete(name, P, M):
    sched = make_schedule(name, P, M)   # validate(): dependencies, one of each action
    key = {(a.kind, sched.virtual(a.stage, a.chunk), a.micro): a.tick for a in sched.actions}
    last = sched.virtual_stages - 1
    for (kind, v, i), t in key.items():
        if kind == "F" and v:
            assert t > key[("F", v - 1, i)]                      # sent, then received
        if kind in ("B", "BW"):
            assert t > key[("F", v, i)]
            if v < last:
                nxt = key.get(("B", v + 1, i), key.get(("BW", v + 1, i)))
                assert t > nxt                                    # after the next stage's B
        if kind == "W":
            assert t > key[("B", v, i)]
    assert sum(a.kind in ("B", "BW") for a in sched.actions) == sched.virtual_stages * M
    prog = compile_program(sched)
    assert prog.slots["res"] == max(sched.peak_activations())  # the residual buffer's slots
    assert prog.table.shape == (sched.ticks, P, len(COL))


def test_validate_catches_a_backward_before_its_forward():
    bad = Schedule("bad", 1, 1, 1, (Action(0, 0, 0, 0, "BW"), Action(1, 0, 0, 0, "F")))
    with pytest.raises(ScheduleError, match="does not come after"):
        bad.validate()
    with pytest.raises(ScheduleError, match="use one of gpipe, 1f1b, zb, dualpipev"):
        make_schedule("interleaved", 2, 4)


def test_print_schedule(capsys):
    assert main(["--schedule", "1f1b", "--stages", "2", "--microbatches", "4"]) == 0
    text = capsys.readouterr().out
    assert "stage 0 F0  F1  .   BW0 F2  BW1 F3  BW2 .   BW3" in text
    assert "peak in-flight micro-batch chunks per stage: [2, 1]" in text
    assert for_mesh("pipeline=4,data=2", 0, "zb").microbatches == 4
    with pytest.raises(ScheduleError, match="no pipeline axis"):
        for_mesh("data=8", 0, "1f1b")


PAIR_HLO = """HloModule m, is_scheduled=true

%fused_b (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %d = f32[8]{0} dot(%p, %p), metadata={op_name="jit(run)/shard_map/while/body/cond/branch_5_fun/while/body/transpose(jvp())/dot_general"}
}

%body (t: (f32[8])) -> (f32[8]) {
  %t = (f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%t), index=0
  %s = (f32[8]{0}, f32[8]{0}) ragged-all-to-all-start(%x), metadata={op_name="jit(run)/shard_map/while/body/cond/branch_5_fun/while/body/jvp()/shard_map/ragged_all_to_all"}
  %f = f32[8]{0} fusion(%x), kind=kOutput, calls=%fused_b
  %d = f32[8]{0} ragged-all-to-all-done(%s)
  %g = f32[8]{0} dot(%d, %d), metadata={op_name="jit(run)/shard_map/while/body/cond/branch_5_fun/while/body/jvp()/dot_general"}
  %a = f32[8]{0} all-to-all(%g), metadata={op_name="jit(run)/shard_map/while/body/cond/branch_5_fun/while/body/jvp()/shard_map/all_to_all"}
  ROOT %r = (f32[8]{0}) tuple(%a)
}

%cond (t: (f32[8])) -> pred[] {
  %t = (f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8]) -> (f32[8]) {
  %x = f32[8]{0} parameter(0)
  %t0 = (f32[8]{0}) tuple(%x)
  ROOT %w = (f32[8]{0}) while(%t0), condition=%cond, body=%body
}
"""


def test_pair_overlap_reads_the_pair_loop():
    """dsv3_jax/aot/overlap.py on a hand-written pair loop: the forward half's ragged
    all-to-all is asynchronous with the backward half's matmul (a fusion) inside its window;
    the dense all-to-all is synchronous. Real compiles: SCALE.md (TPU v5p, H100, CPU)."""
    from dsv3_jax.aot.overlap import pair_overlap
    r = pair_overlap(PAIR_HLO, [5])
    assert r["bodies"] == 1
    assert r["collectives"]["ragged-all-to-all"] == {"count": 1, "async": 1, "with_other_half": 1,
                                                     "with_any_matmul": 1}
    assert r["collectives"]["all-to-all"]["async"] == 0
    assert pair_overlap(PAIR_HLO, [4])["bodies"] == 0
