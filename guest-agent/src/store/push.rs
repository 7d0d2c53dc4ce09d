//! One push, all or nothing: stage every value, keep the old ones, swap,
//! commit through state.json, and undo everything on a failure before that.

use super::*;

/// One change of an all-or-nothing push.
pub enum Change<'a> {
    Write {
        name: &'a str,
        value: &'a [u8],
        mode: u32,
    },
    Remove {
        name: &'a str,
    },
}

impl Change<'_> {
    pub fn name(&self) -> &str {
        match self {
            Change::Write { name, .. } | Change::Remove { name } => name,
        }
    }
}

/// Why a push was not applied, and exactly what of it was.
#[derive(Debug, Error)]
pub enum TxError {
    /// The credentials directory is as it was before the push.
    #[error("{error}")]
    NothingApplied {
        /// The credential whose change failed, if it was one in particular.
        name: Option<String>,
        error: Box<StoreError>,
    },
    /// Undoing a failed push failed too: `applied` hold their new state.
    #[error("{error}; undoing the push failed as well ({rollback}), so {applied:?} changed")]
    Partial {
        name: Option<String>,
        error: Box<StoreError>,
        rollback: Box<StoreError>,
        applied: Vec<String>,
    },
}

/// One change of a push, as planned under the locks.
struct Planned<'a> {
    name: &'a str,
    /// `Some` for a write, `None` for a removal.
    value: Option<(&'a [u8], u32)>,
    had_old: bool,
    /// Bytes of the regular file at the name now (0 if none).
    old_size: u64,
}

impl Planned<'_> {
    fn new_len(&self) -> usize {
        self.value.map_or(0, |(v, _)| v.len())
    }
}

/// Changes made under the store's locks. Dropping it remounts the
/// directory read-only again if it was remounted for these changes.
pub struct Batch<'a> {
    // Field order is drop order: remount read-only before unlocking.
    pub(super) remount: Option<ReadWrite>,
    pub(super) store: &'a Store,
    /// The file lock, then the writers' mutex, released in that order.
    pub(super) _lock: FileLock<'a>,
}

impl Batch<'_> {
    pub(super) fn ensure_writable(&mut self) -> Result<(), StoreError> {
        if self.remount.is_none() {
            self.remount = ReadWrite::acquire(self.store)?;
        }
        Ok(())
    }

    /// Replaces `name` with `value` (mode `mode`) atomically.
    pub fn write(&mut self, name: &str, value: &[u8], mode: u32) -> Result<(), StoreError> {
        let next = self.store.state();
        self.push(&[Change::Write { name, value, mode }], None, next)
            .map_err(TxError::into_store_error)
    }

    /// Removes `name` if it is a regular file; a missing file is already
    /// removed. The caller decides whether the name is vmcred's to remove.
    pub fn remove(&mut self, name: &str) -> Result<(), StoreError> {
        let next = self.store.state();
        self.push(&[Change::Remove { name }], None, next)
            .map_err(TxError::into_store_error)
    }

    /// Applies `changes` all or nothing, and makes `next` the state (saved
    /// to state.json) if and only if every change was made. `generation`
    /// is the push's (recorded in the journal so that a start after a
    /// crash knows whether it was committed); `None` for changes outside a
    /// push (tests, repairs), whose state is saved as given.
    ///
    /// Every new value is staged in a file and synced first; then the old
    /// values are kept under backup names (a hard link, so the name never
    /// goes missing) while the staged files are renamed over; then
    /// state.json is saved, which is the commit; only then are the old
    /// values dropped. A failure before the commit puts every old value
    /// back.
    pub fn push(
        &mut self,
        changes: &[Change<'_>],
        generation: Option<u64>,
        next: State,
    ) -> Result<(), TxError> {
        let store = self.store;
        let none = |name: Option<&str>, error| TxError::NothingApplied {
            name: name.map(str::to_string),
            error: Box::new(error),
        };
        let mut plan = Vec::with_capacity(changes.len());
        for c in changes {
            let p = self.plan(c).map_err(|e| none(Some(c.name()), e))?;
            if let Some(p) = p {
                plan.push(p);
            }
        }
        if plan.is_empty() {
            return self.commit(next).map_err(|e| none(None, e));
        }
        store.check_limits(&plan).map_err(|e| {
            // One write: that one; several: the push as a whole.
            let mut writes = plan.iter().filter(|p| p.value.is_some());
            let name = match (writes.next(), writes.next()) {
                (Some(p), None) => Some(p.name),
                _ => None,
            };
            none(name, e)
        })?;
        self.ensure_writable().map_err(|e| none(None, e))?;
        let pages: u64 = plan
            .iter()
            .map(|p| (p.new_len() as u64).div_ceil(4096).max(1) * 4096)
            .sum();
        if let Some(rw) = self.remount.as_mut() {
            if let Err(e) = rw.ensure_room(store, pages) {
                tracing::warn!(error = %e, "cannot enlarge the credentials file system for the push; trying as it is");
            }
        }
        // Stage every new value.
        let mut staged: Vec<&str> = Vec::new();
        let unstage = |staged: &[&str]| {
            for name in staged {
                let _ = unlinkat(
                    store.dirfd(),
                    tmp_name(name).as_str(),
                    UnlinkatFlags::NoRemoveDir,
                );
            }
        };
        for p in &plan {
            if let Some((value, mode)) = p.value {
                if let Err(e) = store.stage(p.name, value, mode) {
                    unstage(&staged);
                    return Err(none(Some(p.name), e));
                }
                staged.push(p.name);
            }
        }
        let journal = Journal {
            // Outside a push, an interrupted change is rolled back.
            generation: generation.unwrap_or(u64::MAX),
            entries: plan
                .iter()
                .map(|p| JournalEntry {
                    name: p.name.to_string(),
                    remove: p.value.is_none(),
                    had_old: p.had_old,
                })
                .collect(),
        };
        // A backup an earlier push failed to unlink must be gone before the
        // journal names this push: recovery would take it for this push's
        // backup and roll a committed value back over the file.
        for p in &plan {
            if let Err(e) = store.drop_stale_backup(p.name) {
                unstage(&staged);
                return Err(none(Some(p.name), e));
            }
        }
        if let Err(e) = save_json(&store.journal_path, &journal, store.state_sync()) {
            unstage(&staged);
            return Err(none(None, e));
        }
        let mut failure = None;
        for p in &plan {
            if let Err(e) = store.swap_in(p) {
                failure = Some((Some(p.name), e));
                break;
            }
        }
        store.sync_dir();
        let committed = match failure {
            Some(f) => Err(f),
            None => {
                let target = next.clone();
                save_state(&store.state_path, &target, store.state_sync())
                    .map(|()| *lock(&store.state) = target)
                    .map_err(|e| (None, e))
            }
        };
        if let Err((name, error)) = committed {
            let mut failed_undo = None;
            let mut applied = Vec::new();
            for e in journal.entries.iter().rev() {
                if let Err(err) = store.undo_entry(e) {
                    applied.push(e.name.clone());
                    failed_undo.get_or_insert(err);
                }
            }
            store.sync_dir();
            let name = name.map(str::to_string);
            return match failed_undo {
                None => {
                    let _ = remove_file_if_exists(&store.journal_path);
                    Err(TxError::NothingApplied {
                        name,
                        error: Box::new(error),
                    })
                }
                Some(rollback) => {
                    // The journal stays: the next start retries the undo.
                    let mut st = lock(&store.state);
                    for n in &applied {
                        if journal.entries.iter().any(|e| &e.name == n && e.remove) {
                            st.managed.remove(n);
                        } else {
                            st.managed.insert(n.clone());
                        }
                    }
                    Err(TxError::Partial {
                        name,
                        error: Box::new(error),
                        rollback: Box::new(rollback),
                        applied,
                    })
                }
            };
        }
        // Only the old values are left to drop: every staged file was
        // renamed onto its name, so no temporary file is left to remove
        // (recovery's `finish_entry` also removes those, after a crash).
        for e in journal.entries.iter().filter(|e| e.had_old) {
            store.drop_backup(&e.name);
        }
        // The next Hello or push compares against these digests instead of
        // reading the files back. Stamped after the renames, which change
        // the inode's ctime; only a root writer in the guest could change
        // a file between its rename and this stat, while we hold the lock
        // and the mount is writable.
        for p in &plan {
            match p.value {
                Some((value, _)) => store.remember_digest(p.name, value),
                None => store.forget_digest(p.name),
            }
        }
        store.sync_dir();
        if let Err(e) = remove_file_if_exists(&store.journal_path) {
            tracing::warn!(error = %e, "cannot remove the push journal; the next start does");
        }
        Ok(())
    }

    /// Looks at what is at the name now. `None`: nothing to do (removing
    /// a name that is already gone).
    fn plan<'c>(&self, c: &Change<'c>) -> Result<Option<Planned<'c>>, StoreError> {
        let store = self.store;
        let name = c.name();
        check_name(name)?;
        let st = match fstatat(store.dirfd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(store.io("inspect", name, e)),
        };
        let is_dir = st.as_ref().is_some_and(|st| {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
        });
        let old_size = st
            .as_ref()
            .filter(|st| is_regular(st))
            .map_or(0, |st| st.st_size.max(0) as u64);
        match *c {
            Change::Write { name, value, mode } => {
                if mode & !0o444 != 0 || mode & 0o400 == 0 {
                    // The config refuses these; the store does not trust callers.
                    return Err(StoreError::BadName(format!(
                        "mode {mode:04o} for {name} is not a read-only mode the owner can read"
                    )));
                }
                if is_dir {
                    return Err(StoreError::IsDirectory {
                        name: name.to_string(),
                        dir: store.dir_display(),
                    });
                }
                Ok(Some(Planned {
                    name,
                    value: Some((value, mode)),
                    had_old: st.is_some(),
                    old_size,
                }))
            }
            Change::Remove { name } => match st {
                None => Ok(None),
                Some(st) if is_regular(&st) => Ok(Some(Planned {
                    name,
                    value: None,
                    had_old: true,
                    old_size,
                })),
                Some(_) => Err(StoreError::NotRegular {
                    name: name.to_string(),
                    dir: store.dir_display(),
                }),
            },
        }
    }

    /// Persists `state`, then makes it current. If it cannot be saved, the
    /// managed set still changes in memory (what is on disk changed), but
    /// the generation does not advance: a generation counts as applied
    /// only once it survives a restart.
    pub fn commit(&mut self, state: State) -> Result<(), StoreError> {
        let store = self.store;
        if *lock(&store.state) == state {
            return Ok(());
        }
        let saved = save_state(&store.state_path, &state, store.state_sync());
        let mut current = lock(&store.state);
        match saved {
            Ok(()) => {
                *current = state;
                Ok(())
            }
            Err(e) => {
                current.managed = state.managed;
                Err(e)
            }
        }
    }
}

impl TxError {
    /// The underlying error, for callers of one-change batches.
    pub fn into_store_error(self) -> StoreError {
        match self {
            TxError::NothingApplied { error, .. } | TxError::Partial { error, .. } => *error,
        }
    }
}

impl Store {
    /// Writes `value` to the staging file of `name`, and syncs it where
    /// that makes it durable (not on tmpfs/ramfs).
    fn stage(&self, name: &str, value: &[u8], mode: u32) -> Result<(), StoreError> {
        let dirfd = self.dirfd();
        let tmp = tmp_name(name);
        let create = || {
            openat(
                dirfd,
                tmp.as_str(),
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(mode),
            )
        };
        // A stale temporary file (recovery removes them at start, so only
        // a failed unlink leaves one) is removed only when it is in the way.
        let fd = match create() {
            Err(Errno::EEXIST) => {
                match unlinkat(dirfd, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => return Err(self.io("remove the stale temporary file for", name, e)),
                }
                create()
            }
            other => other,
        }
        .map_err(|e| self.io("create the temporary file for", name, e))?;
        let result = (|| {
            // The umask may have narrowed the mode; set exactly what was asked.
            fchmod(&fd, Mode::from_bits_truncate(mode))
                .map_err(|e| self.io("set the mode of", name, e))?;
            let mut file = File::from(fd);
            file.write_all(value)
                .map_err(|e| self.io("write", name, errno_of(&e)))?;
            if !self.creds_durable {
                return Ok(());
            }
            self.count_sync();
            file.sync_all()
                .map_err(|e| self.io("sync", name, errno_of(&e)))
        })();
        if result.is_err() {
            let _ = unlinkat(dirfd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// Keeps the old value under its backup name and puts the new one in
    /// place (or, for a removal, moves the old value aside).
    /// Removes a backup of `name` left behind by an earlier push.
    fn drop_stale_backup(&self, name: &str) -> Result<(), StoreError> {
        match unlinkat(
            self.dirfd(),
            backup_name(name).as_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.io("remove the stale backup of", name, e)),
        }
    }

    fn swap_in(&self, p: &Planned<'_>) -> Result<(), StoreError> {
        let dirfd = self.dirfd();
        // `push` removed a stale backup of this name before it wrote the
        // journal, under the same locks.
        let backup = backup_name(p.name);
        match p.value {
            Some(_) => {
                if p.had_old {
                    nix::unistd::linkat(dirfd, p.name, dirfd, backup.as_str(), AtFlags::empty())
                        .map_err(|e| self.io("keep the old value of", p.name, e))?;
                }
                renameat(dirfd, tmp_name(p.name).as_str(), dirfd, p.name)
                    .map_err(|e| self.io("move into place", p.name, e))
            }
            None => renameat(dirfd, p.name, dirfd, backup.as_str())
                .map_err(|e| self.io("remove", p.name, e)),
        }
    }
}

impl Store {
    /// Checks a push against the budget: the set after the push must fit
    /// (bytes), and every staging file needs an inode while the old files
    /// are still there. Old and new values need not fit in the bytes budget
    /// at once: the file system is enlarged for the push where it has a
    /// size limit (see [`ReadWrite::ensure_room`]).
    fn check_limits(&self, plan: &[Planned<'_>]) -> Result<(), StoreError> {
        let (bytes, inodes) = self.usage()?;
        let old: u64 = plan.iter().map(|p| p.old_size).sum();
        let new: u64 = plan.iter().map(|p| p.new_len() as u64).sum();
        let total = bytes.saturating_sub(old).saturating_add(new);
        let first_write = plan.iter().find(|p| p.value.is_some());
        if total > self.limits.max_total_bytes {
            let writes: Vec<&str> = plan
                .iter()
                .filter(|p| p.value.is_some())
                .map(|p| p.name)
                .collect();
            return Err(StoreError::TotalLimit {
                name: writes.join(", "),
                len: new as usize,
                dir: self.dir_display(),
                total,
                limit: self.limits.max_total_bytes,
                why: if self.limits.max_total_bytes == MAX_TOTAL_BYTES as u64 {
                    " (systemd's 1 MiB credentials mount)"
                } else {
                    ""
                },
            });
        }
        let writes = plan.iter().filter(|p| p.value.is_some()).count() as u64;
        let needed = inodes + writes;
        if writes > 0 && needed > self.limits.max_files {
            return Err(StoreError::FileLimit {
                name: first_write.map(|p| p.name.to_string()).unwrap_or_default(),
                dir: self.dir_display(),
                needed,
                limit: self.limits.max_files,
                why: if self.limits.max_files == MAX_FILES as u64 {
                    " (systemd's credentials mount has nr_inodes=1024; each new value is staged in \
                     a file of its own until the push is committed)"
                } else {
                    " (each new value is staged in a file of its own until the push is committed)"
                },
            });
        }
        Ok(())
    }
}
