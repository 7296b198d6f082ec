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

/// Bytes after which a file's written range is handed to the disk (see [`LocalFile`]).
const WRITEBACK_EVERY: u64 = 32 << 20;

/// A buffered file that starts writing each 32 MiB to the disk as soon as it is written.
///
/// Why: left alone, the kernel keeps a checkpoint's pages dirty in memory until the final
/// fsync, so the disk idles while the tensors are copied and hashed and the fsync then waits
/// for the whole file. Starting writeback early (`sync_file_range`, asynchronous) overlaps the
/// two; the fsync still decides durability.
struct LocalFile {
    file: io::BufWriter<File>,
    written: u64,
    handed_over: u64,
}

impl LocalFile {
    fn start_writeback(&mut self) -> io::Result<()> {
        self.file.flush()?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let (start, len) = (self.handed_over as libc::off64_t, (self.written - self.handed_over) as libc::off64_t);
            // SAFETY: a plain system call on a file descriptor this struct owns. A failure only
            // means the data waits for the fsync, so it is ignored.
            unsafe { libc::sync_file_range(self.file.get_ref().as_raw_fd(), start, len, libc::SYNC_FILE_RANGE_WRITE) };
        }
        self.handed_over = self.written;
        Ok(())
    }
}

impl Write for LocalFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.handed_over >= WRITEBACK_EVERY {
            self.start_writeback()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl SyncWrite for LocalFile {
    fn sync(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_all()
    }
}

impl Storage for LocalFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SyncWrite>> {
        let file = File::create(path)?;
        Ok(Box::new(LocalFile {
            file: io::BufWriter::with_capacity(1 << 20, file),
            written: 0,
            handed_over: 0,
        }))
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
