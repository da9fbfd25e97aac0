//! `make bench`, inside the test kernel: every method at every size, side
//! by side in one boot, median of `VMBEAM_BENCH_RUNS` runs (default 3);
//! writes bench.md, bench.json and bench.png to the directory given (or
//! prints the table only).
//!
//! VMBEAM_BENCH_SIZES (default "64M 256M 1G 2G") and VMBEAM_BENCH_LAB_L2S
//! (default "1 4 16": L2s moved at once by the lab migrate-all rows) choose
//! the points; VMBEAM_BENCH_REAL_RUNS (default: the runs here, 1 from
//! `make bench`) the runs of the real-L1 rows, minutes each. The files are
//! rewritten after every method, so a boot that TCG stops half-way still
//! leaves the points it finished, and with
//! VMBEAM_BENCH_RESUME=1 (tests/run.sh sets it on the boot after one that
//! never reported) the bench reads them back and runs only the others.

use std::path::PathBuf;

use vmbeam::Blocks;
use vmbeam_selftests::{
    bench::{self, lab, methods, output, qemu, real, Row, Sample},
    require,
};

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name).unwrap_or_else(|_| default.into()).split_whitespace().map(str::to_string).collect()
}

/// Runs `f` `runs` times; the failures are reported and left out.
fn sample(what: &str, runs: usize, mut f: impl FnMut() -> Result<Sample, String>) -> Vec<Sample> {
    (0..runs)
        .filter_map(|i| match f() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("bench: {what}, run {i}: {e}");
                None
            }
        })
        .collect()
}

/// The plots of bench.json in `dir`.
fn plots(rows: &[Row], dir: &std::path::Path) -> Result<(), String> {
    output::plot_wall(rows, &dir.join("bench.png"))?;
    output::plot_downtime(rows, &dir.join("bench-downtime.png"))
}

/// bench.md, bench.json and the plots of the rows so far, into `dir`.
fn write(rows: &[Row], runs: usize, sizes: &[u64], dir: &std::path::Path) -> Result<String, String> {
    let mut rows = rows.to_vec();
    // Points a resumed boot added go with their size (a stable sort).
    rows.sort_by_key(|r| r.size);
    output::add_ratios(&mut rows);
    let header = format!(
        "vmbeam bench: median of {runs} runs per point, in the test kernel (QEMU TCG, 2 vCPUs); \
         wall ms ratio to memcpy of the same bytes in the same boot; sizes {}",
        sizes.iter().map(|s| bench::size_name(*s)).collect::<Vec<_>>().join(", ")
    );
    let table = output::markdown(&rows, &header);
    let json = serde_json::json!({ "runs": runs, "page_size": 4096, "rows": rows });
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join("bench.md"), &table))
        .and_then(|()| std::fs::write(dir.join("bench.json"), json.to_string()))
        .map_err(|e| format!("writing {}: {e}", dir.display()))?;
    plots(&rows, dir).map_err(|e| format!("plot: {e}"))?;
    Ok(table)
}

/// Says in DIR/.bench-progress what the bench is doing now, for
/// `tests/run.sh`, which ends a boot whose bench has not moved on for a
/// long time (a stalled test kernel never reports).
fn progress(dir: &Option<PathBuf>, what: &str) {
    if let Some(dir) = dir {
        let _ = std::fs::write(dir.join(".bench-progress"), format!("{what}\n"));
    }
}

/// The rows of DIR/bench.json, if it holds any.
fn read_rows(dir: &std::path::Path) -> Option<Vec<Row>> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("bench.json")).ok()?).ok()?;
    serde_json::from_value(json["rows"].clone()).ok()
}

/// The rows one hand-over kind gives, in order: lazy runs time the
/// transfer, the map and the guest's reads; eager runs the pre-fault.
fn handover_rows(eager: bool) -> &'static [&'static str] {
    if eager {
        &["transfer + map + KVM pre-fault", "transfer + map + KVM pre-fault + guest reads all"]
    } else {
        &["transfer", "transfer + map (populate)", "transfer + map + guest reads all"]
    }
}

/// [`handover_rows`] with their samples from `runs`.
fn handover_samples(runs: &[methods::Handover], eager: bool) -> Vec<(&'static str, Vec<Sample>)> {
    let steps: Vec<Vec<Option<Sample>>> = runs
        .iter()
        .map(|r| {
            if eager {
                vec![r.prefaulted, Some(r.touched)]
            } else {
                vec![r.transfer, Some(r.mapped), Some(r.touched)]
            }
        })
        .collect();
    handover_rows(eager)
        .iter()
        .enumerate()
        .map(|(i, what)| (*what, steps.iter().filter_map(|s| s[i]).collect()))
        .collect()
}

fn main() {
    // `bench --replot DIR`: redraw the plots from DIR/bench.json (no KVM).
    if std::env::args().nth(1).as_deref() == Some("--replot") {
        let dir = PathBuf::from(std::env::args().nth(2).unwrap_or_else(|| "results".into()));
        let rows = read_rows(&dir).unwrap_or_else(|| panic!("{}: no bench.json", dir.display()));
        if let Err(e) = plots(&rows, &dir) {
            eprintln!("bench: plot: {e}");
            std::process::exit(1);
        }
        return;
    }
    let dev = require::vmbeam_and_kvm();
    let out_dir = std::env::args().nth(1).map(PathBuf::from);
    let runs: usize = std::env::var("VMBEAM_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    // Real-L1 runs take minutes each: fewer may be asked for.
    let real_runs: usize =
        std::env::var("VMBEAM_BENCH_REAL_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(runs).max(1);
    let sizes: Vec<u64> = env_list("VMBEAM_BENCH_SIZES", "64M 256M 1G 2G")
        .iter()
        .map(|s| bench::parse_size(s).unwrap_or_else(|| panic!("VMBEAM_BENCH_SIZES: bad size {s}")))
        .collect();
    let lab_counts: Vec<usize> =
        env_list("VMBEAM_BENCH_LAB_L2S", "1 4 16").iter().filter_map(|s| s.parse().ok()).collect();
    // VMBEAM_BENCH_ONLY="gather QEMU": only the methods whose names hold
    // one of these words (memcpy, the yardstick, always runs).
    let only = env_list("VMBEAM_BENCH_ONLY", "");
    let want = |method: &str| only.is_empty() || only.iter().any(|w| method.contains(w.as_str()));
    let resumed = std::env::var("VMBEAM_BENCH_RESUME").is_ok_and(|v| v == "1");
    let mut rows: Vec<Row> = match (&out_dir, resumed) {
        (Some(dir), true) => read_rows(dir).unwrap_or_default(),
        _ => Vec::new(),
    };
    if resumed {
        eprintln!("bench: resuming: {} points from the boot before are kept", rows.len());
    }
    // A point a boot before this one finished (only when resuming).
    let done = |rows: &[Row], method: &str, size| rows.iter().any(|r| r.method == method && r.size == size);
    // A point this run wants (VMBEAM_BENCH_ONLY) and has not got yet.
    let to_run = |rows: &[Row], method: &str, size| want(method) && !done(rows, method, size);
    let push = |rows: &mut Vec<Row>, method: &str, size, samples: &[Sample]| {
        if let Some(row) = Row::of(method, size, samples) {
            eprintln!(
                "bench: {method} {}: {:.1} ms (median of {})",
                bench::size_name(size),
                row.wall_ms,
                samples.len()
            );
            rows.push(row);
            progress(&out_dir, &format!("{method}, {} done", bench::size_name(size)));
            if let Some(dir) = &out_dir {
                if let Err(e) = write(rows, runs, &sizes, dir) {
                    eprintln!("bench: {e}");
                }
            }
        }
    };
    for &size in &sizes {
        let name = bench::size_name(size);
        if !done(&rows, "memcpy", size) {
            push(&mut rows, "memcpy", size, &sample("memcpy", runs, || Ok(methods::memcpy(size))));
        }
        // Lazy: the guest's first touch of a page maps it (a KVM stage-2
        // fault); eager: the VMM pre-faults the memslot first.
        // 1 GiB blocks only where the size holds one.
        let block_sizes = [(Blocks::Page, "4K"), (Blocks::Huge2M, "2M"), (Blocks::Huge1G, "1G")];
        for (blocks, pages) in block_sizes.into_iter().filter(|&(b, _)| b != Blocks::Huge1G || size >= 1 << 30) {
            for eager in [false, true] {
                let label = |what: &str| format!("vmbeam {pages}: {what}");
                if !to_run(&rows, &label(handover_rows(eager)[0]), size) {
                    continue;
                }
                let runs: Vec<methods::Handover> = (0..runs)
                    .filter_map(|_| {
                        methods::vmbeam(&dev, size, blocks, eager)
                            .map_err(|e| eprintln!("bench: vmbeam {pages} {name} (eager {eager}): {e}"))
                            .ok()
                    })
                    .collect();
                for (what, samples) in handover_samples(&runs, eager) {
                    push(&mut rows, &label(what), size, &samples);
                }
            }
        }
        let gathers: Vec<bench::gather::GatherRun> = (0..runs)
            .filter(|_| to_run(&rows, "vmbeam gather: scattered 4K pages out of a RAM region", size))
            .filter_map(|_| bench::gather::gather(&dev, size).map_err(|e| eprintln!("bench: gather {name}: {e}")).ok())
            .collect();
        let gathered: Vec<Sample> = gathers.iter().map(|g| g.gather).collect();
        push(&mut rows, "vmbeam gather: scattered 4K pages out of a RAM region", size, &gathered);
        let scattered: Vec<Sample> = gathers.iter().map(|g| g.scatter).collect();
        push(&mut rows, "vmbeam scatter: a fresh region's pages into the holes (one call)", size, &scattered);
        let filled: Vec<Sample> = gathers.iter().map(|g| g.filled).collect();
        push(&mut rows, "vmbeam gather + fill the holes (new region + one scatter)", size, &filled);
        for eager in [false, true] {
            let label = |what: &str| format!("memfd handover + {}", what.trim_start_matches("transfer + "));
            if !to_run(&rows, &label(handover_rows(eager)[1]), size) {
                continue;
            }
            let runs: Vec<methods::Handover> = (0..runs)
                .filter_map(|_| {
                    methods::memfd(size, eager).map_err(|e| eprintln!("bench: memfd {name} (eager {eager}): {e}")).ok()
                })
                .collect();
            for (what, samples) in handover_samples(&runs, eager).into_iter().filter(|(what, _)| *what != "transfer") {
                push(&mut rows, &label(what), size, &samples);
            }
        }
        if to_run(&rows, "QEMU pre-copy migration", size) {
            push(&mut rows, "QEMU pre-copy migration", size, &sample("QEMU pre-copy", runs, || qemu::precopy(size)));
        }
        if to_run(&rows, "QEMU x-ignore-shared migration", size) {
            push(
                &mut rows,
                "QEMU x-ignore-shared migration",
                size,
                &sample("QEMU x-ignore-shared", runs, || qemu::ignore_shared(size)),
            );
        }
        for &n in &lab_counts {
            // Lab L2s share the test kernel's memory with everything else.
            if n as u64 * size > 2 << 30 {
                continue;
            }
            for (huge, pages) in [(false, "4K"), (true, "2M")] {
                let method = format!("lab migrate-all, {n} L2 of this size, {pages} windows");
                if to_run(&rows, &method, size) {
                    push(&mut rows, &method, size, &sample(&method, runs, || lab::migrate_all(n, size, huge)));
                }
            }
        }
    }
    // The real-L1 rows last, after every other method at every size: TCG
    // stalls or resets the test kernel now and then during them (README,
    // Known flakiness), and a boot lost there must not cost the rest. A
    // setup at every size before the next, the one-at-a-time moves last:
    // the first L2 already runs in the clean L1 when the second's QEMU
    // starts there, and such an L1 is what TCG has stalled most.
    for setup in real::Setup::ALL {
        for &size in &sizes {
            let name = bench::size_name(size);
            // Real L1s hold the L2 twice at L0 (window, then the gathered
            // one in the L1's RAM): 1 GiB is as far as the bench kernel goes.
            let both = setup.method();
            if !to_run(&rows, &format!("{both}: the one on a window"), size) || size > 1 << 30 {
                continue;
            }
            // TCG loses about one real-L1 run in two (README, Known
            // flakiness): up to three tries per run wanted.
            let real: Vec<real::RealRun> = (0..real_runs * 3)
                .filter_map(|i| {
                    progress(&out_dir, &format!("{both}, {name}, try {i}"));
                    real::migrate_all(size, setup).map_err(|e| eprintln!("bench: {both}, {name}, try {i}: {e}")).ok()
                })
                .take(real_runs)
                .collect();
            let window: Vec<Sample> = real.iter().map(|r| r.window).collect();
            push(&mut rows, &format!("{both}: the one on a window"), size, &window);
            let gathered: Vec<Sample> = real.iter().map(|r| r.gathered).collect();
            push(&mut rows, &format!("{both}: the one gathered from L1 RAM"), size, &gathered);
            // The peer at the same level, after the moves with state
            // windows: both L2s run on windows in the clean L1 then.
            if setup.upgrades() {
                let windows = if setup.huge { ", 2M windows and RAM" } else { "" };
                let upgrade: Vec<Sample> = real.iter().flat_map(|r| r.upgrade.iter().copied()).collect();
                let method =
                    format!("real-L1 QEMU x-ignore-shared inside the L1 (local upgrade){windows}, 2 L2s at once");
                push(&mut rows, &method, size, &upgrade);
            }
        }
    }
    let Some(dir) = out_dir else {
        // No directory: the table only.
        output::add_ratios(&mut rows);
        print!("{}", output::markdown(&rows, &format!("vmbeam bench: median of {runs} runs per point")));
        return;
    };
    match write(&rows, runs, &sizes, &dir) {
        Ok(table) => print!("{table}"),
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
    }
    eprintln!("bench: wrote bench.md, bench.json, bench.png, bench-downtime.png in {}", dir.display());
}
