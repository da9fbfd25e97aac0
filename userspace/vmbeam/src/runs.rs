//! Lists of page numbers or offsets as runs, for messages and files: an
//! L2 of 1 GiB is 262,144 frames, but its memory comes in long stretches
//! (2 MiB huge pages, or what the allocator handed out in a row), so a run
//! `[first, count]` of values that each go up by `step` says the same in a
//! few hundred numbers. The agent protocol's frame lists
//! (`control::agent::L2Frames`) and vmbeamctl's migration journal use it,
//! each through a serde adapter beside its own struct.

/// `values` as runs of values that each go up by `step` (with
/// `zeros_repeat`, a run from 0 is a run of zeros: absent frames).
pub fn encode(values: &[u64], step: u64, zeros_repeat: bool) -> Vec<[u64; 2]> {
    let mut runs: Vec<[u64; 2]> = Vec::new();
    for &v in values {
        if let Some([first, count]) = runs.last_mut() {
            let next = if zeros_repeat && *first == 0 { Some(0) } else { first.checked_add(*count * step) };
            if next == Some(v) {
                *count += 1;
                continue;
            }
        }
        runs.push([v, 1]);
    }
    runs
}

/// The values of `runs` (see [`encode`]); refuses more than `limit` of
/// them (a malformed message must not make us allocate without bound) and
/// a run that overflows.
pub fn decode(runs: &[[u64; 2]], step: u64, zeros_repeat: bool, limit: u64) -> Result<Vec<u64>, String> {
    let total = runs.iter().try_fold(0u64, |n, r| n.checked_add(r[1])).ok_or("run counts overflow")?;
    if total > limit {
        return Err(format!("{total} values in runs, more than the {limit} allowed"));
    }
    let mut values = Vec::with_capacity(total as usize);
    for &[first, count] in runs {
        if zeros_repeat && first == 0 {
            values.extend(std::iter::repeat_n(0, count as usize));
            continue;
        }
        let last = count.checked_sub(1).and_then(|c| c.checked_mul(step)).and_then(|d| first.checked_add(d));
        if count > 0 && last.is_none() {
            return Err(format!("run [{first:#x}, {count}] goes past 2^64"));
        }
        values.extend((0..count).map(|i| first + i * step));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_absent_pages() {
        let frames = [7, 8, 9, 0, 0, 0, 20, 21, 5, 0, 1, 2];
        let runs = encode(&frames, 1, true);
        assert_eq!(runs, [[7, 3], [0, 3], [20, 2], [5, 1], [0, 1], [1, 2]]);
        assert_eq!(decode(&runs, 1, true, 100).unwrap(), frames);
    }

    #[test]
    fn offsets_step_by_a_page_and_zero_is_an_offset() {
        let offsets = [0, 4096, 8192, 65536, 12288];
        let runs = encode(&offsets, 4096, false);
        assert_eq!(runs, [[0, 3], [65536, 1], [12288, 1]]);
        assert_eq!(decode(&runs, 4096, false, 100).unwrap(), offsets);
    }

    #[test]
    fn a_huge_page_backed_gigabyte_is_a_few_hundred_numbers() {
        // 512 huge pages, each 512 frames in a row, in no order.
        let frames: Vec<u64> =
            (0..512u64).flat_map(|h| (0..512).map(move |i| ((h * 7919) % 512) * 512 + 1000 + i)).collect();
        let runs = encode(&frames, 1, true);
        assert!(runs.len() <= 512, "{} runs", runs.len());
        assert_eq!(decode(&runs, 1, true, 1 << 18).unwrap(), frames);
    }

    #[test]
    fn malformed_runs_are_refused_not_allocated() {
        assert!(decode(&[[1, u64::MAX]], 1, true, 1 << 16).unwrap_err().contains("more than"));
        assert!(decode(&[[1, 1 << 40], [1, u64::MAX]], 1, true, u64::MAX).unwrap_err().contains("overflow"));
        assert!(decode(&[[u64::MAX, 2]], 1, false, 10).unwrap_err().contains("past 2^64"));
    }
}
