//! A bench run's result as one JSON line, and what is made of many of them: the table of
//! medians with ratios between two systems, and the latency plot.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::BenchConfig;

/// The quantiles a record keeps, for plots.
const QUANTILES: [f64; 10] = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0];

/// One run of one workload against one system.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub case: String,
    pub workload: String,
    #[serde(default)]
    pub clients: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Requests answered (for watch: events delivered).
    pub ok: u64,
    #[serde(default)]
    pub errors: u64,
    /// txn-mixed: transactions whose comparison failed.
    #[serde(default)]
    pub conflicts: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (quantile, milliseconds) pairs.
    #[serde(default)]
    pub percentiles: Vec<(f64, f64)>,
    /// Workload-specific figures (watch: puts, disorder, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Of the time this machine's CPUs were busy during the run, the percentage the host
    /// took for itself (steal, on a virtual machine): a round that lost much of its CPU
    /// this way says more about the host than about the system under test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_pct: Option<f64>,
}

/// The machine's CPU time so far, from the first line of `/proc/stat` (in ticks).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuTimes {
    /// user, nice, system, irq, softirq and steal: time the CPUs were not idle.
    busy: u64,
    steal: u64,
}

impl CpuTimes {
    /// Now, where the system has `/proc/stat`.
    pub fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// From the text of `/proc/stat`: its `cpu` line counts user, nice, system, idle,
    /// iowait, irq, softirq, steal, ... in that order.
    fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        let steal = at(7);
        Some(CpuTimes { busy: at(0) + at(1) + at(2) + at(5) + at(6) + steal, steal })
    }

    /// The percentage of the busy time since `earlier` that was stolen; None when the
    /// CPUs were idle throughout.
    pub fn steal_pct_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let busy = self.busy.checked_sub(earlier.busy)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        (busy > 0).then(|| 100.0 * steal as f64 / busy as f64)
    }
}

impl Record {
    /// `ok` units in `elapsed`, latencies in microseconds.
    pub fn new(cfg: &BenchConfig, workload: &str, ok: u64, elapsed: Duration, latency: &Histogram<u64>) -> Record {
        let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
        Record {
            label: cfg.label.clone(),
            case: if cfg.case.is_empty() { workload.to_string() } else { cfg.case.clone() },
            workload: workload.to_string(),
            clients: cfg.clients,
            rate: cfg.rate,
            ok,
            seconds: elapsed.as_secs_f64(),
            ops_per_sec: ok as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: latency.max() as f64 / 1000.0,
            percentiles: if latency.is_empty() { Vec::new() } else { QUANTILES.iter().map(|q| (*q, ms(*q))).collect() },
            ..Default::default()
        }
    }

    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("a record serializes")
    }

    pub fn table_header() -> &'static str {
        "| case | system | ok | errors | ops/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    }

    pub fn table_row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            self.case,
            self.label,
            self.ok,
            self.errors,
            self.ops_per_sec,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms
        )
    }
}

/// Reads JSON lines, skipping lines that are not records (a script's own output).
pub fn parse_lines(text: &str) -> Vec<Record> {
    text.lines().filter_map(|l| serde_json::from_str::<Record>(l.trim()).ok()).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of one case on one system over its rounds.
#[derive(Clone, Debug)]
pub struct Summary {
    pub case: String,
    pub label: String,
    pub rounds: usize,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Each round's throughput, in the order the rounds ran.
    pub by_round: Vec<f64>,
    /// The round whose throughput is the median (lower middle), for plots.
    pub typical: Record,
    /// The most CPU time the host took in any round, as a percentage (NaN if unknown).
    pub steal_max_pct: f64,
}

/// Groups records by case and system, in the order they first appear.
pub fn summarize(records: &[Record]) -> Vec<Summary> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
    for r in records {
        let k = (r.case.clone(), r.label.clone());
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(r);
    }
    order
        .into_iter()
        .map(|k| {
            let rs = &groups[&k];
            let mut by_tput: Vec<&Record> = rs.clone();
            by_tput.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
            Summary {
                case: k.0.clone(),
                label: k.1.clone(),
                rounds: rs.len(),
                errors: rs.iter().map(|r| r.errors).sum(),
                ops_per_sec: median(rs.iter().map(|r| r.ops_per_sec).collect()),
                p50_ms: median(rs.iter().map(|r| r.p50_ms).collect()),
                p99_ms: median(rs.iter().map(|r| r.p99_ms).collect()),
                by_round: rs.iter().map(|r| r.ops_per_sec).collect(),
                typical: by_tput[(by_tput.len() - 1) / 2].clone(),
                steal_max_pct: rs.iter().filter_map(|r| r.steal_pct).fold(f64::NAN, f64::max),
            }
        })
        .collect()
}

/// The least and the greatest of `a`'s throughput over `b`'s in rounds run side by side
/// (the i-th of each), as "least–greatest"; "–" when there are none.
fn round_ratios(a: &[f64], b: &[f64]) -> String {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).filter(|r| r.is_finite()).collect();
    if r.is_empty() {
        return "–".into();
    }
    let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}–{hi:.2}")
}

/// `x` with `digits` decimals, or "–" when it is unknown (NaN).
fn num(x: f64, digits: usize) -> String {
    if x.is_nan() {
        "–".to_string()
    } else {
        format!("{x:.digits$}")
    }
}

/// The markdown table of medians. With two systems, `a` over `b` ratios: throughput
/// (higher is better for `a`) and p99 latency (lower is better for `a`). Beside the ratio
/// of the medians, the spread of the ratios of rounds run side by side.
pub fn ratio_table(summaries: &[Summary], a: &str, b: &str) -> String {
    let mut out = format!(
        "| case | rounds | {a} ops/s | {b} ops/s | {a}/{b} | by round | {a} p50 ms | {b} p50 ms | {a} p99 ms | {b} p99 ms | p99 {a}/{b} | errors |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    let mut cases: Vec<&str> = Vec::new();
    for s in summaries {
        if !cases.contains(&s.case.as_str()) {
            cases.push(&s.case);
        }
    }
    for case in cases {
        let find = |l: &str| summaries.iter().find(|s| s.case == case && s.label == l);
        let (sa, sb) = (find(a), find(b));
        if sa.is_none() && sb.is_none() {
            continue;
        }
        let get = |s: Option<&Summary>, f: fn(&Summary) -> f64| s.map_or(f64::NAN, f);
        let rounds = sa.or(sb).map_or(0, |s| s.rounds);
        let errors = sa.map_or(0, |s| s.errors) + sb.map_or(0, |s| s.errors);
        let (ta, tb) = (get(sa, |s| s.ops_per_sec), get(sb, |s| s.ops_per_sec));
        let (qa, qb) = (get(sa, |s| s.p99_ms), get(sb, |s| s.p99_ms));
        let spread = match (sa, sb) {
            (Some(x), Some(y)) => round_ratios(&x.by_round, &y.by_round),
            _ => "–".into(),
        };
        out += &format!(
            "| {case} | {rounds} | {} | {} | **{}** | {spread} | {} | {} | {} | {} | {} | {errors} |\n",
            num(ta, 0),
            num(tb, 0),
            num(ta / tb, 2),
            num(get(sa, |s| s.p50_ms), 2),
            num(get(sb, |s| s.p50_ms), 2),
            num(qa, 2),
            num(qb, 2),
            num(qa / qb, 2),
        );
    }
    out
}

/// Single-client put latency against this disk's fsync latency (the `fsync` workload),
/// as lines of text; empty without an fsync record.
pub fn fsync_lines(summaries: &[Summary]) -> String {
    let Some(disk) = summaries.iter().find(|s| s.typical.workload == "fsync") else {
        return String::new();
    };
    let mut out = format!("fsync p50 on this disk: {:.3} ms (median of {} runs)\n", disk.p50_ms, disk.rounds);
    for s in summaries.iter().filter(|s| s.typical.workload == "put" && s.typical.clients == 1) {
        out += &format!("{} on {}: p50 {:.3} ms = {:.2} x fsync\n", s.case, s.label, s.p50_ms, s.p50_ms / disk.p50_ms);
    }
    out
}

/// A table of medians for however many systems, one row per case and system.
pub fn median_table(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| case | system | rounds | ops/s | p50 ms | p99 ms | errors | host steal, most % |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for s in summaries {
        out += &format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {} |\n",
            s.case,
            s.label,
            s.rounds,
            s.ops_per_sec,
            s.p50_ms,
            s.p99_ms,
            s.errors,
            num(s.steal_max_pct, 0)
        );
    }
    out
}

/// Latency by percentile, one panel per case, one line per system (its median round).
pub fn plot_svg(path: &Path, summaries: &[Summary]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let mut cases: Vec<&str> = Vec::new();
    for s in summaries {
        if !s.typical.percentiles.is_empty() && !cases.contains(&s.case.as_str()) {
            cases.push(&s.case);
        }
    }
    let mut labels: Vec<&str> = Vec::new();
    for s in summaries {
        if !labels.contains(&s.label.as_str()) {
            labels.push(&s.label);
        }
    }
    let cols = 2usize;
    let rows = cases.len().div_ceil(cols).max(1);
    let root = SVGBackend::new(path, (1000, 320 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((rows, cols));
    // x: how many nines, -log10(1 - q), so p50 = 0.3, p99 = 2, p99.9 = 3; max drawn at 4.5.
    let x_of = |q: f64| if q >= 1.0 { 4.5 } else { -(1.0 - q).log10() };
    for (case, panel) in cases.iter().zip(panels.iter()) {
        let lines: Vec<&Summary> =
            summaries.iter().filter(|s| s.case == *case && !s.typical.percentiles.is_empty()).collect();
        let ymax = lines.iter().flat_map(|s| s.typical.percentiles.iter().map(|p| p.1)).fold(0.01f64, f64::max);
        let ymin = lines
            .iter()
            .flat_map(|s| s.typical.percentiles.iter().map(|p| p.1))
            .filter(|v| *v > 0.0)
            .fold(ymax, f64::min);
        let mut chart = ChartBuilder::on(panel)
            .caption(*case, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..4.6f64, (ymin * 0.8..ymax * 1.25).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency ms")
            .y_label_formatter(&|y| match *y {
                y if y >= 10.0 => format!("{y:.0}"),
                y if y >= 1.0 => format!("{y:.1}"),
                y => format!("{y:.2}"),
            })
            .x_labels(6)
            .x_label_formatter(&|x| match (*x * 10.0).round() as i64 {
                0 => "p0".into(),
                10 => "p90".into(),
                20 => "p99".into(),
                30 => "p99.9".into(),
                40 => "p99.99".into(),
                45 => "max".into(),
                _ => String::new(),
            })
            .draw()?;
        for s in lines {
            let i = labels.iter().position(|l| *l == s.label).unwrap_or(0);
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> =
                s.typical.percentiles.iter().filter(|p| p.0 > 0.0).map(|p| (x_of(p.0), p.1.max(ymin))).collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(if s.label.is_empty() { "run" } else { s.label.as_str() })
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(label: &str, case: &str, ops: f64, p99: f64) -> Record {
        Record {
            label: label.into(),
            case: case.into(),
            workload: "put".into(),
            ops_per_sec: ops,
            p50_ms: p99 / 2.0,
            p99_ms: p99,
            percentiles: vec![(0.5, p99 / 2.0), (0.99, p99), (1.0, p99 * 2.0)],
            ..Default::default()
        }
    }

    #[test]
    fn medians_and_ratios_come_from_the_middle_round() {
        let rs = [
            rec("meshkv", "put", 300.0, 3.0),
            rec("etcd", "put", 100.0, 9.0),
            rec("meshkv", "put", 100.0, 1.0),
            rec("etcd", "put", 110.0, 10.0),
            rec("meshkv", "put", 200.0, 2.0),
            rec("etcd", "put", 90.0, 11.0),
        ];
        let text: String = rs.iter().map(|r| r.json_line() + "\nnot a record\n").collect();
        let parsed = parse_lines(&text);
        assert_eq!(parsed.len(), 6);
        let s = summarize(&parsed);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].label.as_str(), s[0].ops_per_sec, s[0].p99_ms), ("meshkv", 200.0, 2.0));
        assert_eq!((s[1].label.as_str(), s[1].ops_per_sec, s[1].p99_ms), ("etcd", 100.0, 10.0));
        assert_eq!(s[0].typical.ops_per_sec, 200.0);
        let t = ratio_table(&s, "meshkv", "etcd");
        assert!(
            t.contains("| put | 3 | 200 | 100 | **2.00** | 0.91–3.00 | 1.00 | 5.00 | 2.00 | 10.00 | 0.20 | 0 |"),
            "{t}"
        );
        assert_eq!(s[0].by_round, vec![300.0, 100.0, 200.0], "in the order the rounds ran");

        // The disk is measured in every round; the reference is the median of them.
        let mut rs: Vec<Record> = [0.4, 0.8, 0.2]
            .map(|p99| {
                let mut disk = rec("disk", "fsync", 5000.0, p99);
                disk.workload = "fsync".into();
                disk
            })
            .into();
        let mut one = rec("meshkv", "put, 1 client", 3000.0, 0.6);
        one.clients = 1;
        rs.push(one);
        let s = summarize(&rs);
        assert!(!ratio_table(&s, "meshkv", "etcd").contains("fsync"), "only cases of the two systems");
        let f = fsync_lines(&s);
        assert_eq!(f, "fsync p50 on this disk: 0.200 ms (median of 3 runs)\nput, 1 client on meshkv: p50 0.300 ms = 1.50 x fsync\n");
    }

    #[test]
    fn stolen_time_is_a_share_of_the_busy_time() {
        let a = CpuTimes::parse("cpu  1000 0 200 5000 50 0 100 100 0 0\ncpu0 1 2 3\n").unwrap();
        let b = CpuTimes::parse("cpu  1500 0 300 9000 60 0 150 250 0 0\n").unwrap();
        // 150 stolen of 800 busy (500 user, 100 system, 50 softirq, 150 steal); idle and
        // iowait are not busy.
        assert_eq!(b.steal_pct_since(&a), Some(18.75));
        assert_eq!(a.steal_pct_since(&a), None, "idle throughout");
        assert_eq!(CpuTimes::parse("intr 1 2\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 x 3\n"), None);

        let mut rs = vec![rec("meshkv", "put", 1.0, 1.0), rec("meshkv", "put", 3.0, 1.0), rec("etcd", "put", 1.0, 1.0)];
        rs[0].steal_pct = Some(4.0);
        rs[1].steal_pct = Some(31.4);
        let line = rs[1].json_line();
        assert!(line.contains("\"steal_pct\":31.4"), "{line}");
        assert!(!rs[2].json_line().contains("steal"), "left out when unknown");
        let t = median_table(&summarize(&rs));
        assert!(t.contains("| put | meshkv | 2 | 2 | 0.50 | 1.00 | 0 | 31 |"), "{t}");
        assert!(t.contains("| put | etcd | 1 | 1 | 0.50 | 1.00 | 0 | – |"), "{t}");
    }

    #[test]
    fn a_plot_is_written_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lat.svg");
        let s =
            summarize(&[rec("meshkv", "put", 2.0, 3.0), rec("etcd", "put", 1.0, 6.0), rec("etcd", "range", 1.0, 1.0)]);
        plot_svg(&path, &s).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("meshkv") && svg.contains("range"), "{svg}");
    }
}
