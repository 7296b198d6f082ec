use kiln::schedule::WarmupCosine;

fn schedule() -> WarmupCosine {
    WarmupCosine {
        peak_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 10,
        decay_steps: 110,
    }
}

#[test]
fn warmup_is_linear_up_to_the_peak() {
    let s = schedule();
    assert!((s.lr(0) - 1e-3 / 11.0).abs() < 1e-15);
    assert!((s.lr(4) - 5e-3 / 11.0).abs() < 1e-15);
    assert!((s.lr(9) - 10e-3 / 11.0).abs() < 1e-15);
    assert_eq!(s.lr(10), 1e-3);
}

#[test]
fn cosine_decays_to_the_floor_and_stays() {
    let s = schedule();
    // Halfway through the decay the cosine term is exactly one half.
    assert!((s.lr(60) - (1e-4 + 0.5 * 9e-4)).abs() < 1e-15);
    // A quarter of the way: 0.5 * (1 + cos(pi/4)).
    let expected = 1e-4 + 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) * 9e-4;
    assert!((s.lr(35) - expected).abs() < 1e-15);
    assert_eq!(s.lr(110), 1e-4);
    assert_eq!(s.lr(10_000), 1e-4);
    for step in 10..110 {
        assert!(s.lr(step + 1) <= s.lr(step), "not monotone at {step}");
    }
}
