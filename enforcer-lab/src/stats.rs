//! Small statistics for the benchmarks' reports.

/// p50, p99 and max of a sample (nearest rank).
pub fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[(((p / 100.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(50.0), rank(99.0), v[v.len() - 1])
}
