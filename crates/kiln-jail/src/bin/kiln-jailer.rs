//! `kiln-jailer --spec JSON`: starts one program in a kiln jail (see `kiln_jail::jailer`).
//! kilnd, the CLI and the test fixture run it; nobody needs to by hand.

fn main() {
    let mut args = std::env::args().skip(1);
    let spec = match (args.next().as_deref(), args.next(), args.next()) {
        (Some("--spec"), Some(json), None) => {
            serde_json::from_str::<kiln_jail::JailSpec>(&json).map_err(|e| format!("spec: {e}"))
        }
        _ => Err("usage: kiln-jailer --spec JSON".to_string()),
    };
    let reason = match spec {
        Ok(spec) => kiln_jail::jailer::run(&spec).to_string(),
        Err(e) => e,
    };
    eprintln!("{}{reason}", kiln_jail::ERROR_PREFIX);
    std::process::exit(125);
}
