//! TAP 13 output in the kselftest style.

use std::process::exit;

/// What a test returns: `Err` carries what was expected and what came.
pub type TestResult = Result<(), String>;

/// kselftest exit code for "skipped".
pub const KSFT_SKIP: i32 = 4;

/// Fails the current test with `msg` unless `cond` holds.
pub fn check(cond: bool, msg: impl FnOnce() -> String) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// A TAP 13 stream with a fixed plan.
pub struct Tap {
    planned: usize,
    next: usize,
    failed: usize,
}

impl Tap {
    /// Prints the header and the plan.
    pub fn new(planned: usize) -> Self {
        println!("TAP version 13");
        println!("1..{planned}");
        Self { planned, next: 1, failed: 0 }
    }

    /// Skips the whole program: `1..0 # SKIP reason`, exit 4.
    pub fn skip_all(reason: &str) -> ! {
        println!("TAP version 13");
        println!("1..0 # SKIP {reason}");
        exit(KSFT_SKIP)
    }

    /// Runs one test and prints its line. With `VMBEAM_TEST_FILTER` set,
    /// tests whose names do not contain it are skipped.
    pub fn test(&mut self, name: &str, f: impl FnOnce() -> TestResult) {
        if let Ok(filter) = std::env::var("VMBEAM_TEST_FILTER") {
            if !name.contains(&filter) {
                return self.skip(name, "VMBEAM_TEST_FILTER");
            }
        }
        let n = self.next;
        self.next += 1;
        match f() {
            Ok(()) => println!("ok {n} {name}"),
            Err(msg) => {
                self.failed += 1;
                for line in msg.lines() {
                    println!("# {line}");
                }
                println!("not ok {n} {name}");
            }
        }
    }

    /// Like [`Tap::test`], but a failure whose message contains `marker`
    /// (a known fault of the machine under the test, not of the code under
    /// it) is printed as a diagnostic and the test runs once more; the second
    /// run's result counts. Any other failure counts at once.
    pub fn test_retrying_on(&mut self, marker: &str, name: &str, f: impl Fn() -> TestResult) {
        self.test(name, || match f() {
            Err(msg) if msg.contains(marker) => {
                for line in msg.lines() {
                    println!("# {line}");
                }
                println!("# {name}: failed on {marker}; once more");
                f()
            }
            result => result,
        });
    }

    /// Prints a skipped test line.
    pub fn skip(&mut self, name: &str, reason: &str) {
        println!("ok {} {name} # SKIP {reason}", self.next);
        self.next += 1;
    }

    /// Exits 0 if all passed and as many ran as planned, 1 otherwise (a
    /// plan that does not match is a test that silently did not run, or
    /// one the plan forgot).
    pub fn finish(self) -> ! {
        let ran = self.next - 1;
        if ran != self.planned {
            println!("# planned {} tests, {ran} ran", self.planned);
        }
        exit(i32::from(self.failed > 0 || ran != self.planned))
    }
}
