//! Saved state of fw_cfg: the guest's selection and DMA latch, and the file bytes the guest or
//! a generator changed. Read-only files come back from the board's configuration.

use serde::{Deserialize, Serialize};

use super::FwCfg;
use crate::state::StateError;

const DEVICE: &str = "fw_cfg";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    pub selector: u16,
    pub offset: u32,
    /// The DMA address latch (a high half written, the low half not yet).
    pub dma_address: u64,
    /// Writable files, and generated files whose generator already ran (so a restored guest
    /// reads the tables it linked, not ones built again from a later state).
    pub files: Vec<FwCfgFileState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgFileState {
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl FwCfg {
    pub fn save_state(&self) -> FwCfgState {
        let files = self
            .files
            .iter()
            .filter(|f| f.writable || f.group.is_some_and(|g| self.groups[g].generated))
            .map(|f| FwCfgFileState { name: f.name.clone(), data: f.data.clone() })
            .collect();
        FwCfgState {
            selector: self.selector,
            offset: self.offset,
            dma_address: self.dma_address,
            files,
        }
    }

    /// Restores onto a device built with the same files; checks everything before it changes
    /// anything.
    pub fn restore_state(&mut self, state: &FwCfgState) -> Result<(), StateError> {
        let mut targets = Vec::with_capacity(state.files.len());
        for saved in &state.files {
            let Some(i) = self.find_file(&saved.name) else {
                return Err(StateError::invalid(DEVICE, format!("no file {:?}", saved.name)));
            };
            let file = &self.files[i];
            if file.writable {
                if saved.data.len() != file.data.len() {
                    return Err(StateError::invalid(
                        DEVICE,
                        format!("writable file {:?} changed length", saved.name),
                    ));
                }
            } else if file.group.is_none() {
                return Err(StateError::invalid(
                    DEVICE,
                    format!("file {:?} is neither writable nor generated", saved.name),
                ));
            } else if u32::try_from(saved.data.len()).is_err() {
                return Err(StateError::invalid(DEVICE, "generated file too large"));
            }
            if targets.contains(&i) {
                return Err(StateError::invalid(DEVICE, "a file is saved twice"));
            }
            targets.push(i);
        }
        // A group's files are saved all together once built, or not at all.
        let mut built = vec![false; self.groups.len()];
        for (g, group) in self.groups.iter().enumerate() {
            let saved = group.names.iter().filter(|n| state.files.iter().any(|f| &f.name == *n));
            match saved.count() {
                0 => {}
                n if n == group.names.len() => built[g] = true,
                _ => return Err(StateError::invalid(DEVICE, "generated files saved in part")),
            }
        }
        for (saved, &i) in state.files.iter().zip(&targets) {
            self.files[i].data = saved.data.clone();
        }
        for (group, built) in self.groups.iter_mut().zip(built) {
            group.generated = built;
        }
        self.selector = state.selector;
        self.offset = state.offset;
        self.dma_address = state.dma_address;
        self.rebuild_directory();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use crate::testing::assert_golden;

    const FW_CFG_STATE_HEX: &str = concat!(
        "2000",             // selector
        "07000000",         // offset
        "0000000001000000", // dma_address
        "0100000000000000", // one file
        "0a00000000000000",
        "6574632f766d67656e69", // "etc/vmgeni"
        "0300000000000000",
        "aabbcc",
    );

    #[test]
    fn fw_cfg_state_bytes_are_unchanged() {
        assert_golden(
            &FwCfgState {
                selector: 0x20,
                offset: 7,
                dma_address: 1 << 32,
                files: vec![FwCfgFileState {
                    name: "etc/vmgeni".into(),
                    data: vec![0xaa, 0xbb, 0xcc],
                }],
            },
            FW_CFG_STATE_HEX,
        );
    }
}
