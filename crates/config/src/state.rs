//! `State::apply`: the deterministic transition function (to be completed).

use crate::*;

impl State {
    /// Checks `cmd` against the state without changing it.
    pub fn validate(&self, cmd: &Command) -> Result<(), ConfigError> {
        let _ = cmd;
        Err(ConfigError::InvalidArgument {
            field: "op".into(),
            reason: "not implemented yet".into(),
        })
    }

    /// Applies `cmd`; on `Err` the state is unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, ConfigError> {
        self.validate(cmd)?;
        Ok(Outcome::Done)
    }
}
