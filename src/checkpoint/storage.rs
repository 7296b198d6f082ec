//! How checkpoint files reach the disk: every file is written under a temporary name, fsynced,
//! renamed into place, and the directory fsynced, so a name only ever points at a complete file.
//!
//! The file-system calls go through the [`Storage`] trait so that tests can inject failures
//! (a full disk, a refused rename) at any point and check that nothing earlier is lost.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The file-system operations a checkpoint save performs.
pub trait Storage: Send + Sync {
    /// Creates (truncating) a file for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn SyncWrite>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// A writer whose contents can be made durable.
pub trait SyncWrite: Write + Send {
    fn sync(&mut self) -> io::Result<()>;
}

/// The local file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalFs;

struct LocalFile(io::BufWriter<File>);

impl Write for LocalFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl SyncWrite for LocalFile {
    fn sync(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_all()
    }
}

impl Storage for LocalFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SyncWrite>> {
        let file = File::create(path)?;
        Ok(Box::new(LocalFile(io::BufWriter::with_capacity(1 << 20, file))))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        std::fs::hard_link(original, link)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Marker in the names of files being written; whatever carries it after a crash is debris.
pub const TMP_MARKER: &str = ".tmp-";

/// A unique temporary name beside `target` (hidden, so listings skip it).
pub fn temp_path(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{TMP_MARKER}{}-{n}", std::process::id()))
}

/// Writes a file under a temporary name with `write`, then fsyncs it; returns the temporary
/// path. The temporary file is removed if anything fails.
pub fn write_temp<T>(
    storage: &dyn Storage,
    target: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<T>,
) -> io::Result<(PathBuf, T)> {
    let tmp = temp_path(target);
    let result = (|| {
        let mut file = storage.create(&tmp)?;
        let value = write(&mut *file)?;
        file.sync()?;
        Ok(value)
    })();
    match result {
        Ok(value) => Ok((tmp, value)),
        Err(e) => {
            let _ = storage.remove(&tmp);
            Err(e)
        }
    }
}

/// Writes `bytes` to `target` atomically (temporary file, fsync, rename, directory fsync).
pub fn write_atomic(storage: &dyn Storage, target: &Path, bytes: &[u8]) -> io::Result<()> {
    let (tmp, ()) = write_temp(storage, target, |w| w.write_all(bytes))?;
    if let Err(e) = storage.rename(&tmp, target) {
        let _ = storage.remove(&tmp);
        return Err(e);
    }
    storage.sync_dir(parent(target))
}

pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
