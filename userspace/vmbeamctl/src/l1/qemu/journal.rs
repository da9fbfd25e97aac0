//! The journal of a real-L1 migration in flight, and the witness that
//! settles it if vmbeamctl dies.
//!
//! A real L1 cannot find out by itself whether an L2's pages have left it
//! or arrived: it cannot even look, since touching a page that is not there
//! stops the L1. The lab L1 asks the module who owns a region; an agent
//! inside a real L1 cannot. So, while `migrate-all` runs between real L1s,
//! what is needed to finish or undo the move without vmbeamctl is kept at
//! L0 in a file next to the clean L1's QMP socket (`NAME.migration.json`),
//! and a *witness* waits for vmbeamctl to end:
//! `vmbeamctl l1 recover --journal FILE --after-pid PID`, started in its
//! own process group so that a signal to vmbeamctl's group spares it.
//!
//! vmbeamctl removes the file whenever its flow ends, however it ended
//! (the report then says where every L2 is); the file outlives vmbeamctl
//! only if vmbeamctl was killed. Then the witness settles each L2 by the
//! one fact that decides it, read from the module at L0: are its pages in
//! its clean window? The gather is the commit point, as the transfer ioctl
//! is for lab L1s:
//!
//! | pages in the clean window | the witness |
//! |---|---|
//! | no  | stops the receiving QEMU on the clean L1; resumes the L2 on the aged L1 if it was stopped |
//! | yes | restores the L2 on the clean L1 (unless it runs there already; one whose state was loaded is resumed), then retires its aged copy as `migrate-all` does; if the restore fails, moves the pages back and resumes it on the aged L1 |

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use vmbeam::control::agent::StateAt;

/// What a migration between two real L1s needs to be finished or undone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Journal {
    /// The aged and the clean L1's QMP sockets.
    pub aged: PathBuf,
    pub clean: PathBuf,
    /// `--gather-holes`: gathered frames of the aged L1 stay empty.
    pub holes: bool,
    pub moves: Vec<Entry>,
}

/// One L2 on its way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// The aged window that is its RAM; `None`: ordinary memory of the aged
    /// L1, at `offsets` of its RAM region (known once it is paused).
    pub from_window: Option<u32>,
    /// (As runs in the file: [`offset_runs`].)
    #[serde(default, with = "offset_runs")]
    pub offsets: Vec<u64>,
    /// Its window on the clean L1.
    pub to: u32,
    pub pages: u64,
    /// Its saved CPU and device state (base64), once it is paused (empty
    /// when it moves through the state windows).
    pub state: Option<String>,
    /// Where that state arrived in the clean L1's state window, once sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_at: Option<StateAt>,
    /// Its state is loaded into the clean L1's receiving QEMU, and gone
    /// from the state window: the witness resumes it there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub loaded: bool,
}

/// [`Entry::offsets`] in the file: runs of offsets a page apart
/// ([`vmbeam::runs`]); a plain list (an older journal) is read too.
mod offset_runs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use vmbeam::runs;

    /// The most pages a journal entry may name: an L2 of 256 GiB (a
    /// damaged file must not make the witness allocate without bound).
    const LIMIT: u64 = 1 << 26;

    pub fn serialize<S: Serializer>(offsets: &[u64], s: S) -> Result<S::Ok, S::Error> {
        runs::encode(offsets, 4096, false).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Runs(Vec<[u64; 2]>),
            Plain(Vec<u64>),
        }
        match Form::deserialize(d)? {
            Form::Runs(r) => runs::decode(&r, 4096, false, LIMIT).map_err(serde::de::Error::custom),
            Form::Plain(offsets) => Ok(offsets),
        }
    }
}

/// The journal file of a migration into the L1 whose QMP socket is `qmp`.
pub fn path_for(clean_qmp: &Path) -> PathBuf {
    clean_qmp.with_extension("migration.json")
}

/// The journal on disk while the flow runs; removed when dropped, which
/// every end of the flow does and a killed process does not.
pub struct JournalFile {
    path: PathBuf,
}

impl JournalFile {
    /// Writes the first version and starts the witness, once per file
    /// in the life of this process: migrations run in turn into one clean
    /// L1 (`--one-at-a-time`) write the same file, and one witness settles
    /// whichever is in flight when this process dies (two would settle it
    /// side by side).
    pub fn begin(journal: &Journal) -> Result<Self> {
        static WITNESSED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
        let path = path_for(&journal.clean);
        let file = Self { path };
        file.write(journal)?;
        let mut witnessed = WITNESSED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !witnessed.contains(&file.path) {
            spawn_witness(&file.path)?;
            witnessed.push(file.path.clone());
        }
        Ok(file)
    }

    /// Replaces the file whole (write, then rename): a reader sees the old
    /// version or the new one.
    pub fn write(&self, journal: &Journal) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(journal)?).with_context(|| tmp.display().to_string())?;
        fs::rename(&tmp, &self.path).with_context(|| self.path.display().to_string())
    }
}

impl Drop for JournalFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Reads a journal file.
pub fn read(path: &Path) -> Result<Journal> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a migration journal", path.display()))
}

/// Starts `vmbeamctl l1 recover --journal PATH --after-pid <us>` in its own
/// process group, its output in `PATH` with `.log` for an extension.
fn spawn_witness(path: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("finding vmbeamctl for the witness")?;
    let log = fs::File::create(path.with_extension("log"))?;
    Command::new(exe)
        .args(["l1", "recover", "--journal"])
        .arg(path)
        .arg("--after-pid")
        .arg(std::process::id().to_string())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the witness (vmbeamctl l1 recover)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_reads_back_as_written_and_goes_with_its_file() {
        let dir = std::env::temp_dir().join(format!("vmbeam-journal-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let j = Journal {
            aged: dir.join("aged.qmp"),
            clean: dir.join("clean.qmp"),
            holes: false,
            moves: vec![Entry {
                name: "vm0".into(),
                from_window: None,
                offsets: vec![0, 4096],
                to: 1,
                pages: 2,
                state: Some(String::new()),
                state_at: Some(StateAt { offset: 8 << 20, bytes: 5000 }),
                loaded: true,
            }],
        };
        let file = JournalFile { path: path_for(&j.clean) };
        file.write(&j).unwrap();
        assert_eq!(file.path, dir.join("clean.migration.json"));
        assert_eq!(read(&file.path).unwrap(), j);
        drop(file);
        assert!(!dir.join("clean.migration.json").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn offsets_are_runs_in_the_file_and_an_older_plain_list_still_reads() {
        let e = |offsets: serde_json::Value| serde_json::json!({"name": "g0", "from_window": null, "offsets": offsets, "to": 1, "pages": 2, "state": null});
        let plain: Entry = serde_json::from_value(e(serde_json::json!([0, 8192]))).unwrap();
        let runs: Entry = serde_json::from_value(e(serde_json::json!([[0, 2]]))).unwrap();
        assert_eq!((plain.offsets, runs.offsets.clone()), (vec![0, 8192], vec![0, 4096]));
        assert_eq!(serde_json::to_value(&runs).unwrap()["offsets"], serde_json::json!([[0, 2]]));
        let damaged = serde_json::from_value::<Entry>(e(serde_json::json!([[0, 1u64 << 40]])));
        assert!(damaged.is_err());
    }
}
