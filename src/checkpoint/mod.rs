//! The CheckpointManager: crash-safe checkpoints of the whole training state.
//!
//! - `policy`: *what* to keep (latest, best, epoch, step; top-K cleanup), as pure functions.
//! - `storage`: *how* files reach the disk (temporary name, fsync, rename, directory fsync).
//! - `sidecar`: the `<name>.meta.json` schema and checksum verification.
//! - this module: sequencing. A save snapshots tensor handles on the training thread (cheap:
//!   Burn tensors are immutable and reference-counted), then writes on a background thread while
//!   training goes on; at most one save is in flight and its error surfaces at the next step
//!   (`poll`), the next save, or the end of the run.
//!
//! A checkpoint's files are committed as a set: the tensor files and sidecar are written under
//! temporary names, the previous complete set of the same name is hard-linked aside as
//! `.<file>.prev`, the new files are renamed into place (sidecar last), and the backup is
//! removed. A crash at any instant leaves either a complete set under the name or a complete
//! backup, which loading falls back to and the next [`CheckpointManager::open`] restores.

pub mod policy;
pub mod sidecar;
pub mod storage;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};

use crate::safetensors_io::{PendingTensor, SafetensorsFile, write_to};
use policy::{Kind, Policy};
use sidecar::{CheckpointError, CheckpointPaths, FileEntry, KindLabel, Sidecar, Verification};
use storage::{Storage, TMP_MARKER, parent, write_temp};

/// Suffix of the backup kept while a checkpoint name is being replaced.
const PREV_SUFFIX: &str = ".prev";

/// Everything one save writes, captured on the training thread.
pub struct Snapshot {
    /// Model weights, Hugging Face names and layout.
    pub weights: Vec<PendingTensor>,
    /// Optimizer moments (`exp_avg.<name>`, `exp_avg_sq.<name>`) and EMA weights (`ema.<name>`).
    pub optim: Vec<PendingTensor>,
    /// The sidecar; `kind`, `name` and `files` are filled in per checkpoint name.
    pub sidecar: Sidecar,
    /// `__metadata__` of the weights file.
    pub weights_metadata: std::collections::BTreeMap<String, String>,
}

/// What a finished save wrote.
#[derive(Debug, Clone)]
pub struct SaveReport {
    pub names: Vec<String>,
    pub deleted: Vec<String>,
}

pub struct CheckpointManager {
    dir: PathBuf,
    policy: Policy,
    storage: Arc<dyn Storage>,
    async_saves: bool,
    in_flight: Option<JoinHandle<Result<SaveReport>>>,
    /// Reports of completed saves, oldest first.
    pub completed: Vec<SaveReport>,
}

impl CheckpointManager {
    /// Opens (creating) a checkpoint directory, removing debris of interrupted saves and
    /// restoring any checkpoint whose replacement was interrupted.
    pub fn open(
        dir: &Path,
        policy: Policy,
        storage: Arc<dyn Storage>,
        async_saves: bool,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
        recover(dir, &*storage)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            policy,
            storage,
            async_saves,
            in_flight: None,
            completed: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Writes `snapshot` under the names of `kinds` (in the background when async saving is on),
    /// after waiting for the previous save and reporting its error, if any.
    pub fn save(&mut self, kinds: Vec<Kind>, snapshot: Snapshot) -> Result<()> {
        self.wait()?;
        if kinds.is_empty() {
            return Ok(());
        }
        let job = SaveJob {
            dir: self.dir.clone(),
            policy: self.policy.clone(),
            storage: self.storage.clone(),
            kinds,
            snapshot,
        };
        if self.async_saves {
            let handle = std::thread::Builder::new()
                .name("kiln-checkpoint".into())
                .spawn(move || job.run())
                .context("cannot start the checkpoint thread")?;
            self.in_flight = Some(handle);
        } else {
            let report = job.run()?;
            self.completed.push(report);
        }
        Ok(())
    }

    /// Reports the error of a save that has finished in the background, without waiting for
    /// one still running (called after every training step, so a failed save is known at once).
    pub fn poll(&mut self) -> Result<()> {
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            self.wait()?;
        }
        Ok(())
    }

    /// Waits for the save in flight, if any; returns its error.
    pub fn wait(&mut self) -> Result<()> {
        if let Some(handle) = self.in_flight.take() {
            let report = handle
                .join()
                .map_err(|_| anyhow!("the checkpoint thread panicked"))??;
            self.completed.push(report);
        }
        Ok(())
    }
}

impl Drop for CheckpointManager {
    fn drop(&mut self) {
        // Never abandon a save half-way through on an early return: finish it (its error has
        // nowhere to go at this point, and the files are crash-safe either way).
        let _ = self.wait();
    }
}

struct SaveJob {
    dir: PathBuf,
    policy: Policy,
    storage: Arc<dyn Storage>,
    kinds: Vec<Kind>,
    snapshot: Snapshot,
}

impl SaveJob {
    fn run(self) -> Result<SaveReport> {
        let storage = &*self.storage;
        let first = self.kinds[0].name(self.policy.metric);
        let first_paths = CheckpointPaths::new(&self.dir, &first);
        let Snapshot {
            weights,
            optim,
            sidecar,
            weights_metadata,
        } = self.snapshot;

        // The tensor files are written once and hard-linked under every further name. The two
        // are written at the same time: each is copied off the device and hashed on its own
        // core while the disk takes the other's pages.
        let optim_metadata = [("format".to_string(), "kiln-optimizer".to_string())].into();
        let (weights_written, optim_written) = std::thread::scope(|s| {
            let optim = s.spawn(|| write_temp(storage, &first_paths.optim, |w| write_to(w, &optim_metadata, optim)));
            let weights = write_temp(storage, &first_paths.weights, |w| write_to(w, &weights_metadata, weights));
            (weights, optim.join().expect("the optimizer-state writer panicked"))
        });
        let weights = weights_written.with_context(|| format!("cannot write {}", first_paths.weights.display()));
        let optim = optim_written.with_context(|| format!("cannot write {}", first_paths.optim.display()));
        let ((weights_tmp, weights_digest), (optim_tmp, optim_digest)) = match (weights, optim) {
            (Ok(w), Ok(o)) => (w, o),
            (weights, optim) => {
                // Remove whichever temporary file was completed; report the first failure.
                for (tmp, _) in weights.iter().chain(optim.iter()) {
                    let _ = storage.remove(tmp);
                }
                return Err(weights.and(optim).expect_err("one of the two writes failed"));
            }
        };

        let mut names = Vec::new();
        let mut result = Ok(());
        for kind in &self.kinds {
            let name = kind.name(self.policy.metric);
            let paths = CheckpointPaths::new(&self.dir, &name);
            let mut sidecar = sidecar.clone();
            sidecar.kind = label(kind);
            sidecar.name = name.clone();
            sidecar.files = vec![
                FileEntry::new("weights", &file_name(&paths.weights), weights_digest.clone()),
                FileEntry::new("optimizer", &file_name(&paths.optim), optim_digest.clone()),
            ];
            result = commit(storage, &paths, &weights_tmp, &optim_tmp, &sidecar)
                .with_context(|| format!("cannot save checkpoint {name} in {}", self.dir.display()));
            if result.is_err() {
                break;
            }
            names.push(name);
        }
        let _ = storage.remove(&weights_tmp);
        let _ = storage.remove(&optim_tmp);
        result?;

        let deleted = if self.kinds.iter().any(|k| matches!(k, Kind::Step { .. })) {
            delete_surplus_steps(&self.dir, &self.policy, storage)?
        } else {
            Vec::new()
        };
        Ok(SaveReport { names, deleted })
    }
}

fn label(kind: &Kind) -> KindLabel {
    match kind {
        Kind::Latest => KindLabel::Latest,
        Kind::Best => KindLabel::Best,
        Kind::Epoch { .. } => KindLabel::Epoch,
        Kind::Step { .. } => KindLabel::Step,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn prev_path(path: &Path) -> PathBuf {
    path.with_file_name(format!(".{}{PREV_SUFFIX}", file_name(path)))
}

/// Installs one checkpoint name from the temporary tensor files (linked, so the temporaries
/// stay for further names) and a new sidecar, keeping the previous set as a backup until the
/// new one is complete.
fn commit(
    storage: &dyn Storage,
    paths: &CheckpointPaths,
    weights_tmp: &Path,
    optim_tmp: &Path,
    sidecar: &Sidecar,
) -> Result<()> {
    let dir = parent(&paths.sidecar);
    let (sidecar_tmp, ()) = write_temp(storage, &paths.sidecar, |w| {
        w.write_all(sidecar.to_json().as_bytes())
    })?;
    let w_link = storage::temp_path(&paths.weights);
    let o_link = storage::temp_path(&paths.optim);
    let staged = [(&w_link, weights_tmp), (&o_link, optim_tmp)];
    let cleanup = |extra: &[&Path]| {
        for p in [w_link.as_path(), o_link.as_path(), sidecar_tmp.as_path()]
            .into_iter()
            .chain(extra.iter().copied())
        {
            let _ = storage.remove(p);
        }
    };
    for (link, original) in staged {
        if let Err(e) = link_or_copy(storage, original, link) {
            cleanup(&[]);
            return Err(e.into());
        }
    }

    // Back up the current complete set (if any) so that a crash mid-replacement loses nothing.
    let had_previous = paths.sidecar.exists();
    if had_previous {
        for file in paths.all() {
            let backup = prev_path(file);
            let linked = storage
                .remove(&backup)
                .and_then(|()| storage.hard_link(file, &backup));
            if let Err(e) = linked {
                cleanup(&[]);
                return Err(e.into());
            }
        }
        storage.sync_dir(dir)?;
    }
    let renames = [
        (&w_link, &paths.weights),
        (&o_link, &paths.optim),
        (&sidecar_tmp, &paths.sidecar),
    ];
    for (from, to) in renames {
        if let Err(e) = storage.rename(from, to) {
            cleanup(&[]);
            // The name may now hold a mix of old and new files; the backup is the complete old
            // set, so put it back.
            if had_previous {
                restore_backup(storage, paths)?;
            }
            return Err(e.into());
        }
    }
    storage.sync_dir(dir)?;
    if had_previous {
        for file in paths.all() {
            storage.remove(&prev_path(file))?;
        }
        storage.sync_dir(dir)?;
    }
    Ok(())
}

fn link_or_copy(storage: &dyn Storage, original: &Path, link: &Path) -> std::io::Result<()> {
    match storage.hard_link(original, link) {
        Ok(()) => Ok(()),
        Err(_) => {
            let (tmp, ()) = write_temp(storage, link, |w| {
                let mut src = std::fs::File::open(original)?;
                std::io::copy(&mut src, w).map(|_| ())
            })?;
            storage.rename(&tmp, link)
        }
    }
}

fn restore_backup(storage: &dyn Storage, paths: &CheckpointPaths) -> Result<()> {
    for file in paths.all() {
        let backup = prev_path(file);
        if backup.exists() {
            storage.rename(&backup, file)?;
        }
    }
    storage.sync_dir(parent(&paths.sidecar))?;
    Ok(())
}

/// Deletes step checkpoints beyond the top-K by the tracked metric. Each goes sidecar first, so
/// it stops being a checkpoint before any tensor file disappears.
fn delete_surplus_steps(dir: &Path, policy: &Policy, storage: &dyn Storage) -> Result<Vec<String>> {
    let mut steps = Vec::new();
    for entry in list(dir)? {
        if let Ok(sidecar) = &entry.sidecar
            && sidecar.kind == KindLabel::Step
        {
            let metric = sidecar.metrics.get(policy.metric.name()).copied();
            steps.push((sidecar.global_step, metric));
        }
    }
    let mut deleted = Vec::new();
    for step in policy.step_checkpoints_to_delete(&steps) {
        let name = Kind::Step { step }.name(policy.metric);
        let paths = CheckpointPaths::new(dir, &name);
        storage.remove(&paths.sidecar)?;
        storage.sync_dir(dir)?;
        storage.remove(&paths.weights)?;
        storage.remove(&paths.optim)?;
        deleted.push(name);
    }
    if !deleted.is_empty() {
        storage.sync_dir(dir)?;
    }
    Ok(deleted)
}

/// Removes temporaries of interrupted saves and settles interrupted replacements: where the
/// named set is complete the backup is dropped, otherwise the backup is restored.
pub fn recover(dir: &Path, storage: &dyn Storage) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list checkpoint directory {}", dir.display()))?;
    let mut backups = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(TMP_MARKER) {
            storage.remove(&entry.path())?;
        } else if let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(PREV_SUFFIX)) {
            if let Some(ck) = stem.strip_suffix(".meta.json") {
                backups.push(ck.to_string());
            }
        }
    }
    for name in backups {
        let paths = CheckpointPaths::new(dir, &name);
        if verify(&paths).is_ok() {
            for file in paths.all() {
                storage.remove(&prev_path(file))?;
            }
        } else {
            restore_backup(storage, &paths)?;
        }
    }
    // Orphaned single backups (a crash while the backup links were being made).
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(PREV_SUFFIX) {
            storage.remove(&entry.path())?;
        }
    }
    storage.sync_dir(dir)?;
    Ok(())
}

/// Reads a checkpoint's sidecar, verifies its tensor files' sizes and checksums, and checks
/// that each is a well-formed safetensors file.
pub fn verify(paths: &CheckpointPaths) -> Result<Sidecar, CheckpointError> {
    let sidecar = Sidecar::read(&paths.sidecar)?;
    let dir = parent(&paths.sidecar);
    open_verified(&sidecar, |name| dir.join(name))?;
    Ok(sidecar)
}

/// A checkpoint whose tensor files are open for reading. From [`load`] its checksums have been
/// verified; from [`open`] they may still be being verified, and nothing read from it may be
/// kept until [`LoadedCheckpoint::verified`] succeeds.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub paths: CheckpointPaths,
    pub sidecar: Sidecar,
    pub weights: SafetensorsFile,
    pub optim: SafetensorsFile,
    verification: Option<Verification>,
}

impl LoadedCheckpoint {
    /// Waits for the checksums [`open`] left being verified (at once after [`load`]).
    pub fn verified(&mut self) -> Result<(), CheckpointError> {
        self.verification.take().map_or(Ok(()), Verification::finish)
    }
}

/// Opens the tensor files `sidecar` records (each located by `locate`), parsing their headers.
fn open_files(
    sidecar: &Sidecar,
    locate: impl Fn(&str) -> PathBuf,
) -> Result<(SafetensorsFile, SafetensorsFile), CheckpointError> {
    let open = |role: &str| {
        let entry = sidecar.files.iter().find(|f| f.role == role).ok_or_else(|| {
            CheckpointError::Sidecar {
                path: PathBuf::from(&sidecar.name),
                reason: format!("no `{role}` file is recorded"),
            }
        })?;
        let path = locate(&entry.name);
        SafetensorsFile::open(&path).map_err(|e| CheckpointError::File {
            path,
            problem: e.to_string(),
        })
    };
    Ok((open("weights")?, open("optimizer")?))
}

/// Verifies the tensor files `sidecar` records, then opens them: exactly the files whose
/// checksums were checked, each hashed and parsed once.
fn open_verified(
    sidecar: &Sidecar,
    locate: impl Fn(&str) -> PathBuf,
) -> Result<(SafetensorsFile, SafetensorsFile), CheckpointError> {
    sidecar.verify_files_at(&locate)?;
    open_files(sidecar, locate)
}

/// Loads the checkpoint `path` names (any of its files), verifying checksums and headers. If a
/// replacement of it was interrupted and its backup is complete, the backup is used.
pub fn load(path: &Path) -> Result<LoadedCheckpoint> {
    let paths = CheckpointPaths::from_any(path);
    let dir = parent(&paths.sidecar).to_path_buf();
    let current = Sidecar::read(&paths.sidecar)
        .and_then(|s| open_verified(&s, |name| dir.join(name)).map(|files| (s, files)));
    let (paths, sidecar, (weights, optim)) = match current {
        Ok((sidecar, files)) => (paths, sidecar, files),
        Err(err) => {
            // A backup's sidecar records the regular file names; its files are the copies.
            let backup = CheckpointPaths {
                weights: prev_path(&paths.weights),
                optim: prev_path(&paths.optim),
                sidecar: prev_path(&paths.sidecar),
            };
            let restored = Sidecar::read(&backup.sidecar).and_then(|s| {
                open_verified(&s, |name| prev_path(&dir.join(name))).map(|files| (s, files))
            });
            match restored {
                Ok((sidecar, files)) => {
                    tracing::warn!(
                        "{}: {err}; using the complete previous version kept while it was being replaced",
                        paths.sidecar.display()
                    );
                    (backup, sidecar, files)
                }
                Err(_) => return Err(err.into()),
            }
        }
    };
    Ok(LoadedCheckpoint {
        paths,
        sidecar,
        weights,
        optim,
        verification: None,
    })
}

/// Opens the checkpoint `path` names for reading while its checksums are verified on
/// background threads: a resume reads its tensors (copies and transposes on the thread pool)
/// while the files are hashed, which alone takes as long as the reading. The caller calls
/// [`LoadedCheckpoint::verified`] before keeping anything it read. The sidecar and the file
/// headers are checked before this returns. Where an interrupted replacement left a backup,
/// choosing between the two needs the checksums first, so this is [`load`].
pub fn open(path: &Path) -> Result<LoadedCheckpoint> {
    let paths = CheckpointPaths::from_any(path);
    if prev_path(&paths.sidecar).exists() {
        return load(path);
    }
    let sidecar = Sidecar::read(&paths.sidecar)?;
    let dir = parent(&paths.sidecar).to_path_buf();
    let verification = sidecar.start_verifying(|name| dir.join(name))?;
    match open_files(&sidecar, |name| dir.join(name)) {
        Ok((weights, optim)) => Ok(LoadedCheckpoint {
            paths,
            sidecar,
            weights,
            optim,
            verification: Some(verification),
        }),
        // A file its checksum condemns is reported as such, not by how its header broke.
        Err(err) => {
            verification.finish()?;
            Err(err.into())
        }
    }
}

/// One checkpoint found in a directory.
#[derive(Debug)]
pub struct Listed {
    pub name: String,
    pub paths: CheckpointPaths,
    /// The sidecar, or why it could not be read.
    pub sidecar: Result<Sidecar, String>,
}

/// The checkpoints in `dir` (by sidecar), sorted by name; debris and backups are skipped.
pub fn list(dir: &Path) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list checkpoint directory {}", dir.display()))?;
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Some(stem) = name.strip_suffix(".meta.json") {
            let paths = CheckpointPaths::new(dir, stem);
            let sidecar = Sidecar::read(&paths.sidecar).map_err(|e| e.to_string());
            out.push(Listed {
                name: stem.to_string(),
                paths,
                sidecar,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Fails unless `dir` holds a complete, verified `checkpoint_latest`.
pub fn require_latest(dir: &Path) -> Result<Sidecar> {
    let paths = CheckpointPaths::new(dir, "checkpoint_latest");
    match load(&paths.weights) {
        Ok(ck) => Ok(ck.sidecar),
        Err(e) => bail!("{}: {e:#}", dir.display()),
    }
}
