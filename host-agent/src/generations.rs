//! The last generation sent to each VM, kept on disk so that a restarted
//! host agent never reuses a number: the guest refuses anything not newer
//! than what it applied, so a reused number would be a refused rotation.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Generations {
    dir: PathBuf,
}

impl Generations {
    pub fn open(dir: PathBuf) -> std::io::Result<Generations> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Generations { dir })
    }

    /// The last generation sent to `vm`; 0 if none. An unreadable file is
    /// an error, not a zero, so a damaged state never rolls numbers back.
    pub fn get(&self, vm: &str) -> std::io::Result<u64> {
        match std::fs::read_to_string(self.dir.join(vm)) {
            Ok(s) => s.trim().parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} does not hold a generation number; fix or remove it",
                        self.dir.join(vm).display()
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Records `generation` durably before it is sent.
    pub fn set(&self, vm: &str, generation: u64) -> std::io::Result<()> {
        vmcred_proto::fsutil::write_atomic(
            &self.dir.join(vm),
            format!("{generation}\n").as_bytes(),
            0o600,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_refuses_garbage() {
        let d = tempfile::tempdir().unwrap();
        let g = Generations::open(d.path().join("g")).unwrap();
        assert_eq!(g.get("vm").unwrap(), 0);
        g.set("vm", 41).unwrap();
        assert_eq!(
            Generations::open(d.path().join("g"))
                .unwrap()
                .get("vm")
                .unwrap(),
            41
        );
        std::fs::write(d.path().join("g/vm"), "x").unwrap();
        assert!(g.get("vm").is_err());
    }
}
