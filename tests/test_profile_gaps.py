"""bench.decode_profile's idle-gap report: where the GPU waits for the host."""

from types import SimpleNamespace

from bench.decode_profile import Span, gpu_idle_report, host_ops_at, idle_gaps


def event(name: str, start: float, end: float, device: str, annotation: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        name=name,
        time_range=SimpleNamespace(start=start, end=end),
        device_type=f"DeviceType.{device}",
        is_user_annotation=annotation,
    )


def test_idle_gaps_are_the_holes_in_the_union_of_busy_intervals():
    busy = [(50, 60), (0, 10), (5, 20), (20, 30), (31, 40), (100, 150), (120, 130)]
    assert idle_gaps(busy, min_us=5) == [(40, 50), (60, 100)]
    assert idle_gaps(busy, min_us=1) == [(30, 31), (40, 50), (60, 100)]
    assert idle_gaps([], min_us=1) == []


def test_host_ops_at_gives_the_innermost_and_outermost_span_running_then():
    step = Span(0, 100, "step")
    layer = Span(10, 40, "layer")
    hook = Span(20, 25, "hook")
    other_thread = Span(30, 90, "optimizer")
    found = host_ops_at([5, 22, 35, 95, 120], [hook, other_thread, step, layer])
    assert found == [
        (step, step),
        (hook, step),
        (layer, step),  # layer (30 long) is shorter than the other thread's optimizer (60 long)
        (step, step),
        None,
    ]


def test_gpu_idle_report_charges_each_gap_to_the_host_op_running_in_it():
    events = [
        event("kernel_a", 0, 100, "CUDA"),
        event("kernel_b", 400, 500, "CUDA"),  # 300 us idle before it, inside "sync_hook"
        event("kernel_c", 510, 1000, "CUDA"),  # 10 us gap: under min_us, not counted
        event("## annotation ##", 0, 1000, "CUDA", annotation=True),  # not a kernel
        event("train_step", 0, 1000, "CPU"),
        event("sync_hook", 120, 390, "CPU"),
    ]
    report = gpu_idle_report(events, reps=2, min_us=20)
    assert report["span_ms_per_step"] == 0.5
    assert report["idle_ms_per_step"] == 0.15
    assert report["idle_gaps_per_step"] == 0.5
    assert report["idle_by_innermost_host_op"] == [{"host_op": "sync_hook", "idle_ms_per_step": 0.15}]
    assert report["idle_by_outermost_host_op"] == [{"host_op": "train_step", "idle_ms_per_step": 0.15}]
    assert gpu_idle_report([event("x", 0, 1, "CPU")], reps=1) == {}
