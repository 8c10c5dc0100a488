//! Dockerfile parsing. One type per instruction (`instruction.rs`); the lexer (`lexer.rs`)
//! handles directives, comments, line continuations and the escape character. Everything
//! unsupported is rejected here, before any work, with its line number and a reason.

mod instruction;
mod lexer;
mod words;

pub use instruction::*;
pub use words::substitute;

/// A parse error: the line it happened on and what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl ParseError {
    pub fn new(line: usize, message: impl Into<String>) -> Self {
        ParseError {
            line,
            message: message.into(),
        }
    }
}

/// One instruction and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    /// The logical line as written (continuations joined), for logs and cache keys.
    pub text: String,
    pub instruction: Instruction,
}

/// A parsed single-stage Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// `ARG`s declared before `FROM` (usable in `FROM` only, as in Docker).
    pub global_args: Vec<Arg>,
    pub from: From,
    pub from_line: usize,
    pub steps: Vec<Step>,
}

/// Largest Dockerfile accepted.
pub const MAX_DOCKERFILE_BYTES: usize = 1024 * 1024;
/// Most instructions after FROM. Each RUN, COPY or ADD is a disk layer in the image's chain
/// (which a jail reads whole), so the chain stays far below what a VM can open.
pub const MAX_STEPS: usize = 256;

impl Dockerfile {
    pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
        if text.len() > MAX_DOCKERFILE_BYTES {
            return Err(ParseError::new(
                1,
                format!("the Dockerfile is over {MAX_DOCKERFILE_BYTES} bytes"),
            ));
        }
        let lines = lexer::logical_lines(text)?;
        let mut global_args = Vec::new();
        let mut from: Option<(From, usize)> = None;
        let mut steps = Vec::new();
        for logical in lines {
            let instruction = Instruction::parse(
                &logical.keyword,
                &logical.args,
                logical.line,
                logical.escape,
            )?;
            match instruction {
                Instruction::From(f) => {
                    if from.is_some() {
                        return Err(ParseError::new(
                            logical.line,
                            "a second FROM: multi-stage builds are not supported; build one stage per image",
                        ));
                    }
                    from = Some((f, logical.line));
                }
                Instruction::Arg(a) if from.is_none() => global_args.push(a),
                other if from.is_none() => {
                    return Err(ParseError::new(
                        logical.line,
                        format!(
                            "{} before FROM: only ARG may come before FROM",
                            other.keyword()
                        ),
                    ))
                }
                _ if steps.len() >= MAX_STEPS => {
                    return Err(ParseError::new(
                        logical.line,
                        format!(
                            "over {MAX_STEPS} instructions after FROM: join RUN lines with && \
                             or split the image"
                        ),
                    ))
                }
                instruction => steps.push(Step {
                    line: logical.line,
                    text: logical.text,
                    instruction,
                }),
            }
        }
        let Some((from, from_line)) = from else {
            return Err(ParseError::new(
                1,
                "no FROM instruction: a Dockerfile starts with FROM <base image>",
            ));
        };
        Ok(Dockerfile {
            global_args,
            from,
            from_line,
            steps,
        })
    }
}

#[cfg(test)]
mod tests;
