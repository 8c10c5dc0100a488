use super::*;

fn parse(text: &str) -> Dockerfile {
    Dockerfile::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn error(text: &str) -> ParseError {
    Dockerfile::parse(text).expect_err("must not parse")
}

#[test]
fn parses_the_seed_dockerfile() {
    let df = parse(
        "FROM debian\n\
         # System dependencies\n\
         RUN apt-get update && \\\n    apt-get install -y python3 python3-pip\n\
         COPY requirements.txt .\n\
         RUN pip install --no-cache-dir -r requirements.txt\n\
         WORKDIR /sandbox\n\
         COPY executor.py .\n\
         EXPOSE 8080\n\
         CMD [\"python3\", \"executor.py\"]\n",
    );
    assert_eq!(df.from.image, "debian");
    let keywords: Vec<_> = df.steps.iter().map(|s| s.instruction.keyword()).collect();
    assert_eq!(
        keywords,
        ["RUN", "COPY", "RUN", "WORKDIR", "COPY", "EXPOSE", "CMD"]
    );
    assert_eq!(df.steps[0].line, 3);
    assert_eq!(df.steps[1].line, 5, "continuation lines count");
    match &df.steps[0].instruction {
        Instruction::Run(r) => assert_eq!(
            r.command,
            CommandForm::Shell("apt-get update && apt-get install -y python3 python3-pip".into())
        ),
        other => panic!("{other:?}"),
    }
    match &df.steps[6].instruction {
        Instruction::Cmd(c) => assert_eq!(
            c.command,
            CommandForm::Exec(vec!["python3".into(), "executor.py".into()])
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_supported_instruction_parses() {
    let df = parse(
        "ARG BASE=busybox\nFROM $BASE AS app\nARG VERSION=1\nENV A=1 B=\"two words\"\nENV LEGACY value with spaces\n\
         LABEL org.example=yes \"quoted key\"=v\nUSER nobody:nogroup\nEXPOSE 8080 9000/tcp\n\
         SHELL [\"/bin/sh\", \"-ec\"]\nCOPY --chown=1:2 --chmod=640 a b* /dst/\nADD ctx.tar /opt\n\
         ENTRYPOINT [\"/bin/app\"]\nCMD --flag\nRUN [\"echo\", \"exec form\"]\n",
    );
    assert_eq!(
        df.global_args,
        vec![Arg {
            name: "BASE".into(),
            default: Some("busybox".into())
        }]
    );
    assert_eq!(
        df.from,
        From {
            image: "$BASE".into(),
            alias: Some("app".into())
        }
    );
    let env = df.steps.iter().find_map(|s| match &s.instruction {
        Instruction::Env(e) => Some(e.vars.clone()),
        _ => None,
    });
    assert_eq!(
        env.unwrap(),
        vec![("A".into(), "1".into()), ("B".into(), "two words".into())]
    );
    assert!(df.steps.iter().any(|s| matches!(&s.instruction, Instruction::Env(e) if e.vars == vec![("LEGACY".to_string(), "value with spaces".to_string())])));
    let copy = df.steps.iter().find_map(|s| match &s.instruction {
        Instruction::Copy(c) => Some(c.transfer.clone()),
        _ => None,
    });
    let copy = copy.unwrap();
    assert_eq!(copy.sources, vec!["a", "b*"]);
    assert_eq!(copy.dest, "/dst/");
    assert_eq!(copy.chown.as_deref(), Some("1:2"));
    assert_eq!(copy.chmod, Some(0o640));
    assert_eq!(df.steps.len(), 12);
}

#[test]
fn escape_directive_and_comments_inside_continuations() {
    let df = parse("# escape=`\nFROM busybox\nRUN echo a `\n# a comment in the middle\n\n    b\nWORKDIR C:\\dir\n");
    match &df.steps[0].instruction {
        Instruction::Run(r) => assert_eq!(r.command, CommandForm::Shell("echo a b".into())),
        other => panic!("{other:?}"),
    }
    assert!(matches!(&df.steps[1].instruction, Instruction::Workdir(w) if w.path == "C:\\dir"));
}

#[test]
fn unsupported_and_malformed_lines_name_the_line_and_the_fix() {
    let cases = [
        ("FROM a\nHEALTHCHECK CMD true\n", 2, "/ready"),
        ("FROM a\nVOLUME /data\n", 2, "not supported"),
        ("FROM a\nONBUILD RUN x\n", 2, "not supported"),
        ("FROM a AS one\nFROM b\n", 2, "multi-stage"),
        ("FROM a\nCOPY --from=one /x /y\n", 2, "multi-stage"),
        ("RUN echo\nFROM a\n", 1, "before FROM"),
        ("# nothing\n", 1, "no FROM"),
        (
            "FROM a\nFROBNICATE x\n",
            2,
            "unknown instruction FROBNICATE",
        ),
        ("FROM a\nRUN\n", 2, "needs a command"),
        ("FROM a\nCMD [\"unterminated\n", 2, "JSON array"),
        ("FROM a\nCOPY onlyone\n", 2, "source and a destination"),
        ("FROM a\nEXPOSE http\n", 2, "port number"),
        ("FROM a\nENV 1BAD=x\n", 2, "valid variable name"),
        ("FROM a\nADD https://example.invalid/x.tgz /x\n", 2, "URL"),
        ("FROM a\nSHELL /bin/bash -c\n", 2, "JSON array"),
        ("FROM a\nRUN --mount=type=cache echo\n", 2, "--mount"),
        ("FROM a\nENV A=\"open\n", 2, "quote"),
        ("# escape=x\nFROM a\n", 1, "escape directive"),
    ];
    for (text, line, needle) in cases {
        let e = error(text);
        assert_eq!(e.line, line, "{text:?}: {e}");
        assert!(
            e.to_string().contains(needle),
            "{text:?}: {e} should mention {needle}"
        );
    }
}

#[test]
fn substitution_follows_docker_rules() {
    let vars = |n: &str| match n {
        "NAME" => Some("kiln".to_string()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    assert_eq!(substitute("$NAME/${NAME}-x", &vars).unwrap(), "kiln/kiln-x");
    assert_eq!(
        substitute("${MISSING:-def} ${NAME:-def}", &vars).unwrap(),
        "def kiln"
    );
    assert_eq!(
        substitute("${NAME:+set} ${EMPTY:+set}|", &vars).unwrap(),
        "set |"
    );
    assert_eq!(substitute("cost \\$5 $", &vars).unwrap(), "cost $5 $");
    assert!(substitute("${NAME", &vars).is_err());
    // Doubling a variable line after line stops at the limit, with what to do.
    let big = "a".repeat(40 * 1024);
    let doubled = |_: &str| Some(big.clone());
    let err = substitute("$A$A", &doubled).unwrap_err();
    assert!(err.contains("65536 bytes"), "{err}");
    assert_eq!(substitute("$A", &doubled).unwrap().len(), 40 * 1024);
}

#[test]
fn oversized_dockerfiles_are_refused() {
    let big = format!(
        "FROM a\n{}",
        "RUN true\n".repeat(MAX_DOCKERFILE_BYTES / 9 + 1)
    );
    assert!(error(&big).to_string().contains("bytes"));
}

#[test]
fn too_many_steps_are_refused_at_the_first_one_over() {
    let ok = format!("FROM a\n{}", "RUN true\n".repeat(MAX_STEPS));
    assert_eq!(Dockerfile::parse(&ok).unwrap().steps.len(), MAX_STEPS);
    let over = format!("FROM a\n{}", "RUN true\n".repeat(MAX_STEPS + 1));
    let e = error(&over);
    assert_eq!(e.line, MAX_STEPS + 2, "{e}");
    assert!(e.to_string().contains("over 256 instructions"), "{e}");
}
