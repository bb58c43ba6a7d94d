//! Expressions in pipeline files (predicates of filters and splitters, keys of sharders) are CEL,
//! the Common Expression Language, through the `cel` crate; never a parser of our own.

/// A compiled expression and its source.
pub struct Expr {
    source: String,
    program: cel::Program,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

impl Expr {
    /// Compiles `source`; the error says what is wrong with it.
    pub fn compile(source: &str) -> Result<Self, String> {
        if source.trim().is_empty() {
            return Err("the expression is empty".into());
        }
        let program = cel::Program::compile(source).map_err(|e| {
            // The first line says what is wrong; the rest draws the expression again.
            let why = e.to_string();
            let why = why.lines().next().unwrap_or_default().trim().to_owned();
            let why = why
                .strip_prefix("ERROR: <input>:")
                .unwrap_or(&why)
                .to_owned();
            format!("bad expression `{source}`: {why}")
        })?;
        Ok(Self {
            source: source.to_owned(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn program(&self) -> &cel::Program {
        &self.program
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_cel_and_explains_what_is_not() {
        assert!(Expr::compile("data.kind == 'image' && data.object.size < 1000").is_ok());
        let err = Expr::compile("data.kind == ").unwrap_err();
        assert!(err.starts_with("bad expression `data.kind == `"), "{err}");
        assert!(Expr::compile("  ").is_err());
    }
}
