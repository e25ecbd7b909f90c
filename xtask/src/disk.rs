//! A small filesystem of its own for the chaos soak's dispatcher state dir
//! (`cargo xtask chaos --storage-faults`), so storage faults are real ones:
//! an ext4 image loop-mounted over the directory, filled to the last block
//! by a ballast file (the store's writes fail with SQLITE_FULL) and frozen
//! with `fsfreeze` (every write and fsync blocks until it is thawed, like a
//! device that stopped answering). Needs root, as `mount` does; the soak
//! refuses to start without it rather than skipping the faults.
//!
//! Whatever happens, [`Disk`]'s drop thaws, removes the ballast and
//! unmounts, so a failed soak never leaves a frozen filesystem behind.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The loop-mounted filesystem and the faults it is under.
pub struct Disk {
    image: PathBuf,
    mount: PathBuf,
    ballast: PathBuf,
    frozen: bool,
    full: bool,
    mounted: bool,
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Unmounts whatever an earlier soak that died left mounted at `dir`, so
/// the directory can be cleared; quiet when nothing is mounted there.
pub fn release_stale(dir: &Path) {
    let _ = Command::new("fsfreeze").arg("-u").arg(dir).output();
    let _ = Command::new("umount").arg(dir).output();
}

impl Disk {
    /// Creates a `size_mib` ext4 image at `image` (no blocks reserved for
    /// root: the dispatcher may run as root and must see the disk full)
    /// and mounts it at `mount`.
    pub fn mount(image: &Path, mount: &Path, size_mib: u64) -> Result<Disk> {
        if run("id", &["-u"])?.trim() != "0" {
            bail!(
                "--storage-faults needs root (it loop-mounts a filesystem for the dispatcher's state \
                 dir to fill and freeze); run it as root, or without --storage-faults"
            );
        }
        let file =
            fs::File::create(image).with_context(|| format!("creating {}", image.display()))?;
        file.set_len(size_mib * 1024 * 1024)?;
        drop(file);
        let image_arg = image.display().to_string();
        let mount_arg = mount.display().to_string();
        run("mkfs.ext4", &["-q", "-F", "-m", "0", &image_arg])?;
        fs::create_dir_all(mount)?;
        run("mount", &["-o", "loop", &image_arg, &mount_arg])
            .context("loop-mounting the dispatcher's state dir")?;
        Ok(Disk {
            image: image.to_path_buf(),
            mount: mount.to_path_buf(),
            ballast: mount.join("ballast"),
            frozen: false,
            full: false,
            mounted: true,
        })
    }

    /// Fills the filesystem to its last block; returns the bytes taken.
    pub fn fill(&mut self) -> Result<u64> {
        // ext4 needs some blocks for the file's own extents, so one
        // allocation of all that `df` shows fails: allocate nearly all of
        // it, then top up with small writes until the disk says no.
        let bulk = self.available()?.saturating_sub(4 << 20);
        run(
            "fallocate",
            &["-l", &bulk.to_string(), &self.ballast.display().to_string()],
        )?;
        self.full = true;
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&self.ballast)
            .with_context(|| format!("opening {}", self.ballast.display()))?;
        let block = [0u8; 4096];
        let mut topped = 0u64;
        // Bounded: 8 MiB of 4 KiB writes is more than the margin left.
        for _ in 0..2048 {
            match file.write_all(&block).and_then(|()| file.sync_data()) {
                Ok(()) => topped += block.len() as u64,
                Err(err) if err.raw_os_error() == Some(28) => break,
                Err(err) => return Err(err).context("topping up the ballast"),
            }
        }
        Ok(bulk + topped)
    }

    /// Gives the space back.
    pub fn free(&mut self) -> Result<()> {
        if self.full {
            fs::remove_file(&self.ballast)
                .with_context(|| format!("removing {}", self.ballast.display()))?;
            self.full = false;
        }
        Ok(())
    }

    /// Freezes the filesystem: writes and fsyncs block until [`Disk::thaw`].
    pub fn freeze(&mut self) -> Result<()> {
        run("fsfreeze", &["-f", &self.mount.display().to_string()])?;
        self.frozen = true;
        Ok(())
    }

    /// Lets blocked writes go on.
    pub fn thaw(&mut self) -> Result<()> {
        if self.frozen {
            run("fsfreeze", &["-u", &self.mount.display().to_string()])?;
            self.frozen = false;
        }
        Ok(())
    }

    fn available(&self) -> Result<u64> {
        let out = run(
            "df",
            &["-B1", "--output=avail", &self.mount.display().to_string()],
        )?;
        out.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("reading df's answer: {out:?}"))
    }

    /// Ends every fault, copies the filesystem's files to `keep` when given
    /// (a failed soak keeps its store for reading), and unmounts.
    pub fn unmount(&mut self, keep: Option<&Path>) -> Result<()> {
        self.thaw()?;
        self.free()?;
        if let Some(keep) = keep {
            fs::create_dir_all(keep)?;
            for entry in fs::read_dir(&self.mount)? {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    fs::copy(entry.path(), keep.join(entry.file_name()))?;
                }
            }
        }
        if self.mounted {
            run("umount", &[&self.mount.display().to_string()])?;
            self.mounted = false;
            let _ = fs::remove_file(&self.image);
        }
        Ok(())
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Err(err) = self.unmount(None) {
            eprintln!(
                "chaos: could not release the loop-mounted state dir {}: {err:#}",
                self.mount.display()
            );
        }
    }
}
