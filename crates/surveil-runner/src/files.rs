//! Finding files of a checkout by glob pattern, for `artifacts`,
//! `reports` and `hashFiles(...)`, and copying trees for the cache.
//!
//! It never follows a symbolic link: a checkout is written by the
//! pipeline (and its commit may contain links), and the runner reads and
//! writes it with more rights than the tasks have. Callers use it only
//! while no task of the job runs, so nothing changes under it.

use std::io;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// More matching files than this is a mistake in the pattern.
pub const MAX_FILES: usize = 10_000;

/// The regular files under `root` (relative, `/`-separated, sorted) that
/// match any of `patterns`; `*` stays within one directory, `**` crosses
/// them. `.git` is never searched. At most [`MAX_FILES`].
pub fn matching(root: &Path, patterns: &[String]) -> io::Result<Vec<String>> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    let set = glob_set(patterns)?;
    let mut found = Vec::new();
    walk(root, "", &mut |relative, meta| {
        if meta.is_file() && set.is_match(relative) {
            if found.len() == MAX_FILES {
                return Err(io::Error::other(format!(
                    "more than {MAX_FILES} files match {patterns:?}"
                )));
            }
            found.push(relative.to_owned());
        }
        Ok(())
    })?;
    found.sort();
    Ok(found)
}

fn glob_set(patterns: &[String]) -> io::Result<GlobSet> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(io::Error::other)?;
        builder.add(glob);
    }
    builder.build().map_err(io::Error::other)
}

/// Calls `visit` with every entry under `dir` (links not followed).
fn walk(
    dir: &Path,
    prefix: &str,
    visit: &mut dyn FnMut(&str, &std::fs::Metadata) -> io::Result<()>,
) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if prefix.is_empty() && name == ".git" {
            continue;
        }
        let relative = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        };
        let meta = entry.path().symlink_metadata()?;
        visit(&relative, &meta)?;
        if meta.is_dir() {
            walk(&entry.path(), &relative, visit)?;
        }
    }
    Ok(())
}

/// Copies `from` (a file, a link or a directory tree) to `to`, links as
/// links; anything in the way at `to` that is not a directory where one is
/// needed is removed first, so a link there is never written through.
/// Returns the bytes of regular files copied.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<u64> {
    let meta = from.symlink_metadata()?;
    let existing = to.symlink_metadata().ok();
    if meta.is_dir() {
        match existing {
            Some(e) if e.is_dir() => {}
            Some(_) => {
                std::fs::remove_file(to)?;
                std::fs::create_dir(to)?;
            }
            None => std::fs::create_dir(to)?,
        }
        let mut bytes = 0;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            bytes += copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(bytes);
    }
    match existing {
        Some(e) if e.is_dir() => std::fs::remove_dir_all(to)?,
        Some(_) => std::fs::remove_file(to)?,
        None => {}
    }
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
        Ok(0)
    } else if meta.is_file() {
        // `to` is gone now, so this creates a new file: no link followed.
        std::fs::copy(from, to)
    } else {
        // Sockets, fifos, devices: nothing worth keeping.
        Ok(0)
    }
}

/// Total bytes of the regular files under `path` (links not followed).
pub fn size_of(path: &Path) -> io::Result<u64> {
    let meta = path.symlink_metadata()?;
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    let mut total = 0;
    walk(path, "", &mut |_, meta| {
        if meta.is_file() {
            total += meta.len();
        }
        Ok(())
    })?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_files_only_never_through_links_or_git() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for file in [
            "a.xml",
            "reports/b.xml",
            "reports/deep/c.xml",
            ".git/d.xml",
            "x.txt",
        ] {
            let path = root.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("reports/passwd.xml")).unwrap();
        let find = |p: &[&str]| {
            matching(root, &p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        assert_eq!(find(&["reports/*.xml"]), ["reports/b.xml"]);
        assert_eq!(
            find(&["**/*.xml"]),
            ["a.xml", "reports/b.xml", "reports/deep/c.xml"]
        );
        assert!(find(&["etc/**"]).is_empty());
        assert!(find(&[]).is_empty());
    }

    #[test]
    fn copy_tree_replaces_a_link_in_the_way_instead_of_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to, outside) = (
            dir.path().join("from"),
            dir.path().join("to"),
            dir.path().join("outside"),
        );
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("sub/f"), "new").unwrap();
        std::os::unix::fs::symlink("f", from.join("sub/l")).unwrap();
        std::fs::create_dir_all(&to).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, to.join("sub")).unwrap();
        assert_eq!(copy_tree(&from, &to).unwrap(), 3);
        assert_eq!(std::fs::read_to_string(to.join("sub/f")).unwrap(), "new");
        assert_eq!(
            std::fs::read_link(to.join("sub/l")).unwrap(),
            Path::new("f")
        );
        assert!(
            std::fs::read_dir(&outside).unwrap().next().is_none(),
            "nothing written through the link"
        );
        assert_eq!(size_of(&to).unwrap(), 3);
    }
}
