//! One type per Dockerfile instruction, each parsing its own arguments.

use super::words::{json_array, key_values, split_words, valid_name};
use super::ParseError;

/// `RUN`, `CMD` and `ENTRYPOINT` take a shell string or an exec array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandForm {
    Shell(String),
    Exec(Vec<String>),
}

impl CommandForm {
    fn parse(args: &str, line: usize, keyword: &str) -> Result<CommandForm, ParseError> {
        if args.trim().is_empty() {
            return Err(ParseError::new(line, format!("{keyword} needs a command")));
        }
        if let Some(argv) = json_array(args) {
            return Ok(CommandForm::Exec(argv));
        }
        if args.trim_start().starts_with('[') {
            return Err(ParseError::new(
                line,
                format!("{keyword} looks like exec form but is not a JSON array of strings (use double quotes)"),
            ));
        }
        Ok(CommandForm::Shell(args.to_string()))
    }

    /// The argv to run, wrapping shell form in `shell`.
    pub fn argv(&self, shell: &[String]) -> Vec<String> {
        match self {
            CommandForm::Exec(argv) => argv.clone(),
            CommandForm::Shell(cmd) => shell
                .iter()
                .cloned()
                .chain(std::iter::once(cmd.clone()))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct From {
    pub image: String,
    pub alias: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub command: CommandForm,
}

/// Sources, destination and options shared by COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub sources: Vec<String>,
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub transfer: Transfer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Add {
    pub transfer: Transfer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workdir {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub vars: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub name: String,
    pub default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    /// As written (`8080`, `8080/tcp`); validated once variables are substituted.
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub command: CommandForm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entrypoint {
    pub command: CommandForm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shell {
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    From(From),
    Run(Run),
    Copy(Copy),
    Add(Add),
    Workdir(Workdir),
    Env(Env),
    Arg(Arg),
    User(User),
    Expose(Expose),
    Cmd(Cmd),
    Entrypoint(Entrypoint),
    Label(Label),
    Shell(Shell),
}

/// Instructions Docker has that kiln refuses, with the reason shown to the user.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "HEALTHCHECK",
        "kiln checks readiness with the /ready hook on the hook port instead",
    ),
    (
        "VOLUME",
        "a microVM's whole disk persists across suspend; there are no volumes to declare",
    ),
    ("ONBUILD", "images are not used as build parents"),
    ("STOPSIGNAL", "the /terminate hook replaces stop signals"),
    (
        "MAINTAINER",
        "deprecated in Docker too: use LABEL maintainer=…",
    ),
];

impl Instruction {
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::From(_) => "FROM",
            Instruction::Run(_) => "RUN",
            Instruction::Copy(_) => "COPY",
            Instruction::Add(_) => "ADD",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::Env(_) => "ENV",
            Instruction::Arg(_) => "ARG",
            Instruction::User(_) => "USER",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Cmd(_) => "CMD",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Label(_) => "LABEL",
            Instruction::Shell(_) => "SHELL",
        }
    }

    pub fn parse(
        keyword: &str,
        args: &str,
        line: usize,
        escape: char,
    ) -> Result<Instruction, ParseError> {
        let err = |m: String| ParseError::new(line, m);
        Ok(match keyword {
            "FROM" => {
                let words = split_words(args, escape).map_err(err)?;
                if words.iter().any(|w| w.starts_with("--")) {
                    return Err(err(
                        "FROM options such as --platform are not supported".into()
                    ));
                }
                match words.as_slice() {
                    [image] => Instruction::From(From {
                        image: image.clone(),
                        alias: None,
                    }),
                    [image, as_kw, alias] if as_kw.eq_ignore_ascii_case("as") => {
                        Instruction::From(From {
                            image: image.clone(),
                            alias: Some(alias.clone()),
                        })
                    }
                    _ => {
                        return Err(err(
                            "FROM takes an image name, optionally followed by AS <name>".into(),
                        ))
                    }
                }
            }
            "RUN" => {
                if args.trim_start().starts_with("--") {
                    return Err(err("RUN options such as --mount are not supported".into()));
                }
                Instruction::Run(Run {
                    command: CommandForm::parse(args, line, "RUN")?,
                })
            }
            "COPY" => Instruction::Copy(Copy {
                transfer: Transfer::parse(args, line, "COPY", escape)?,
            }),
            "ADD" => {
                let transfer = Transfer::parse(args, line, "ADD", escape)?;
                if let Some(url) = transfer.sources.iter().find(|s| s.contains("://")) {
                    return Err(err(format!(
                        "ADD from a URL ({url}) is not supported: download it in a RUN step, or put the file in the build context"
                    )));
                }
                Instruction::Add(Add { transfer })
            }
            "WORKDIR" => {
                let path = args.trim();
                if path.is_empty() {
                    return Err(err("WORKDIR needs a path".into()));
                }
                Instruction::Workdir(Workdir {
                    path: path.to_string(),
                })
            }
            "ENV" => {
                let vars = key_values(args, escape, true).map_err(|m| err(format!("ENV: {m}")))?;
                if let Some((bad, _)) = vars.iter().find(|(k, _)| !valid_name(k)) {
                    return Err(err(format!("ENV: {bad:?} is not a valid variable name")));
                }
                Instruction::Env(Env { vars })
            }
            "ARG" => {
                let words = split_words(args, escape).map_err(err)?;
                let [word] = words.as_slice() else {
                    return Err(err("ARG takes one name, optionally with =default".into()));
                };
                let (name, default) = match word.split_once('=') {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (word.clone(), None),
                };
                if !valid_name(&name) {
                    return Err(err(format!("ARG: {name:?} is not a valid variable name")));
                }
                Instruction::Arg(Arg { name, default })
            }
            "USER" => {
                let user = args.trim();
                if user.is_empty() || user.contains(char::is_whitespace) {
                    return Err(err("USER takes one user[:group]".into()));
                }
                Instruction::User(User {
                    user: user.to_string(),
                })
            }
            "EXPOSE" => {
                let ports = split_words(args, escape).map_err(err)?;
                if ports.is_empty() {
                    return Err(err("EXPOSE needs at least one port".into()));
                }
                for p in ports.iter().filter(|p| !p.contains('$')) {
                    parse_port(p).map_err(|m| err(format!("EXPOSE: {m}")))?;
                }
                Instruction::Expose(Expose { ports })
            }
            "CMD" => Instruction::Cmd(Cmd {
                command: CommandForm::parse(args, line, "CMD")?,
            }),
            "ENTRYPOINT" => Instruction::Entrypoint(Entrypoint {
                command: CommandForm::parse(args, line, "ENTRYPOINT")?,
            }),
            "LABEL" => {
                let labels =
                    key_values(args, escape, false).map_err(|m| err(format!("LABEL: {m}")))?;
                Instruction::Label(Label { labels })
            }
            "SHELL" => match json_array(args) {
                Some(argv) if !argv.is_empty() => Instruction::Shell(Shell { argv }),
                _ => {
                    return Err(err(
                        "SHELL must be a JSON array, e.g. SHELL [\"/bin/bash\", \"-c\"]".into(),
                    ))
                }
            },
            other => {
                if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| *k == other) {
                    return Err(err(format!("{other} is not supported: {why}")));
                }
                return Err(err(format!("unknown instruction {other}")));
            }
        })
    }
}

/// `8080` or `8080/tcp` → port number; only TCP is meaningful to kiln's ingress.
pub fn parse_port(text: &str) -> Result<u16, String> {
    let (number, proto) = text.split_once('/').unwrap_or((text, "tcp"));
    if !proto.eq_ignore_ascii_case("tcp") && !proto.eq_ignore_ascii_case("udp") {
        return Err(format!("{text:?}: protocol must be tcp or udp"));
    }
    match number.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{text:?} is not a port number (1-65535)")),
    }
}

impl Transfer {
    fn parse(args: &str, line: usize, keyword: &str, escape: char) -> Result<Transfer, ParseError> {
        let err = |m: String| ParseError::new(line, m);
        let mut rest = args.trim();
        let (mut chown, mut chmod) = (None, None);
        while let Some(flag_text) = rest.strip_prefix("--") {
            let end = flag_text
                .find(char::is_whitespace)
                .unwrap_or(flag_text.len());
            let flag = &flag_text[..end];
            rest = flag_text[end..].trim_start();
            match flag.split_once('=') {
                Some(("chown", v)) if !v.is_empty() => chown = Some(v.to_string()),
                Some(("chmod", v)) => {
                    chmod = Some(u32::from_str_radix(v, 8).map_err(|_| {
                        err(format!("{keyword} --chmod={v}: use an octal mode like 755"))
                    })?)
                }
                Some(("from", _)) => {
                    return Err(err(format!(
                        "{keyword} --from needs multi-stage builds, which are not supported"
                    )))
                }
                _ => {
                    return Err(err(format!(
                        "{keyword} option --{flag} is not supported (only --chown and --chmod)"
                    )))
                }
            }
        }
        let words = match json_array(rest) {
            Some(words) => words,
            None => split_words(rest, escape).map_err(err)?,
        };
        let (dest, sources) = match words.split_last() {
            Some((dest, sources)) if !sources.is_empty() => (dest, sources),
            _ => {
                return Err(err(format!(
                    "{keyword} needs at least one source and a destination"
                )))
            }
        };
        Ok(Transfer {
            sources: sources.to_vec(),
            dest: dest.clone(),
            chown,
            chmod,
        })
    }
}
