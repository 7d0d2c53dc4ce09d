//! The push journal and the repair at open after a crash at any point.

use super::*;

/// The in-flight push, written before the first rename: lets a start after
/// a crash roll it back (state.json has an older generation) or finish it
/// (state.json has this generation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Journal {
    pub(super) generation: u64,
    pub(super) entries: Vec<JournalEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JournalEntry {
    pub(super) name: String,
    pub(super) remove: bool,
    /// Something was at the name before: it is kept under the backup name
    /// until the push is committed.
    pub(super) had_old: bool,
}

impl Store {
    /// Brings the directory back to a whole state after a crash: see
    /// [`Store::open`]. Holds the write locks while it does.
    pub(super) fn recover(&self) -> Result<(), StoreError> {
        let journal = load_journal(&self.journal_path)?;
        let leftovers = self.staging_names()?;
        let mut batch = self.batch()?;
        let writable_but_expected_ro = self.mount.read_only && !self.is_read_only()?;
        let grown = self
            .mount
            .size_bytes
            .is_some_and(|want| self.tmpfs_size().is_some_and(|have| have != want));
        if journal.is_none() && leftovers.is_empty() && !writable_but_expected_ro && !grown {
            return Ok(());
        }
        tracing::warn!(
            dir = %self.dir_display(),
            push_in_flight = journal.is_some(),
            staging_files = leftovers.len(),
            writable = writable_but_expected_ro,
            enlarged = grown,
            "repairing what an interrupted write left behind"
        );
        batch.ensure_writable()?;
        if let Some(j) = journal {
            let committed = self.state().generation >= j.generation;
            for e in j.entries.iter().rev() {
                if committed {
                    self.finish_entry(e);
                } else {
                    // On failure the journal stays: the next start retries.
                    self.undo_entry(e)?;
                }
            }
            tracing::warn!(
                generation = j.generation,
                "{} the push that was interrupted",
                if committed { "finished" } else { "rolled back" }
            );
            remove_file_if_exists(&self.journal_path).map_err(|e| StoreError::SaveState {
                path: self.journal_path.display().to_string(),
                why: e.to_string(),
            })?;
        }
        for name in self.staging_names()? {
            match unlinkat(self.dirfd(), name.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(self.io("remove the leftover staging file", &name, e)),
            }
        }
        self.sync_dir();
        // Dropping the batch shrinks the tmpfs back and remounts read-only.
        drop(batch);
        if self.mount.read_only && !self.is_read_only()? {
            return Err(StoreError::Remount {
                dir: self.dir_display(),
                why: "it is still writable after the repair".into(),
            });
        }
        Ok(())
    }

    /// Names in the directory that are vmcred's staging files.
    fn staging_names(&self) -> Result<Vec<String>, StoreError> {
        let mut d = Dir::openat(
            self.dirfd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| StoreError::DirIo {
            op: "list",
            dir: self.dir_display(),
            errno: e,
        })?;
        let mut out = Vec::new();
        for entry in d.iter() {
            let entry = entry.map_err(|e| StoreError::DirIo {
                op: "list",
                dir: self.dir_display(),
                errno: e,
            })?;
            if let Ok(name) = entry.file_name().to_str() {
                if reserved_name(name).is_some() {
                    out.push(name.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Undoes one change of an uncommitted push (idempotent).
    pub(super) fn undo_entry(&self, e: &JournalEntry) -> Result<(), StoreError> {
        let dirfd = self.dirfd();
        let backup = backup_name(&e.name);
        if e.had_old {
            match renameat(dirfd, backup.as_str(), dirfd, e.name.as_str()) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(err) => return Err(self.io("restore the old value of", &e.name, err)),
            }
        } else if !e.remove {
            match unlinkat(dirfd, e.name.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(err) => return Err(self.io("remove the new", &e.name, err)),
            }
        }
        // A rename between two links of one file does nothing: drop the
        // backup name in that case, and the staged value in any case.
        for n in [backup, tmp_name(&e.name)] {
            match unlinkat(dirfd, n.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(err) => return Err(self.io("remove the staging file for", &e.name, err)),
            }
        }
        Ok(())
    }

    /// Drops the old value of a committed push's change, kept under its
    /// backup name until the commit.
    pub(super) fn drop_backup(&self, name: &str) {
        self.remove_staging(name, &backup_name(name));
    }

    /// Completes one change of a committed push: drops the old value.
    pub(super) fn finish_entry(&self, e: &JournalEntry) {
        for n in [backup_name(&e.name), tmp_name(&e.name)] {
            self.remove_staging(&e.name, &n);
        }
    }

    /// Removes `file`, a staging name of credential `name`; already gone is
    /// fine, and a failure is left for the next start's sweep.
    fn remove_staging(&self, name: &str, file: &str) {
        match unlinkat(self.dirfd(), file, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(err) => {
                tracing::warn!(name = %name, error = %err, "cannot remove a staging file; the next start removes it")
            }
        }
    }
}

/// The push journal, if a push was interrupted. One that cannot be read
/// stops the start: guessing could lose a credential.
fn load_journal(path: &Path) -> Result<Option<Journal>, StoreError> {
    let corrupt = |why: String| StoreError::CorruptState {
        path: path.display().to_string(),
        why,
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(corrupt(e.to_string())),
    };
    let j: Journal = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    for e in &j.entries {
        check_name(&e.name).map_err(|err| corrupt(err.to_string()))?;
    }
    Ok(Some(j))
}
