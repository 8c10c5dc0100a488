//! Baking images from Dockerfiles on real guests (busybox base): the whole flow, the step
//! cache, and every bad input, each leaving nothing half-made behind.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_image::{BuildSpec, ImageStatus};
use kiln_testkit::TestBuilder;
use kiln_vmm::Template;

const START_SH: &str = "#!/bin/sh\n\
mkdir -p /srv/hooks /srv/www\n\
echo ok > /srv/hooks/ready\n\
echo \"hello from $APP_DIR as $(id -u)\" > /srv/www/index.html\n\
httpd -p 127.0.0.1:9000 -h /srv/hooks\n\
exec httpd -f -p 8080 -h /srv/www\n";

fn app_files(run_line: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "Dockerfile",
            format!(
                "# a busybox app\nFROM busybox\nARG GREETING=hello\nENV APP_DIR=/srv/app\nWORKDIR $APP_DIR\n\
                 COPY app/ ./\nCOPY --chown=nobody:nogroup config.txt /etc/app/\n{run_line}\n\
                 EXPOSE 8080\nCMD [\"/srv/app/start.sh\"]\n"
            ),
        ),
        ("app/start.sh", START_SH.to_string()),
        ("app/lib/data.txt", "data\n".to_string()),
        ("config.txt", "setting=1\n".to_string()),
        ("ignored.log", "not copied\n".to_string()),
        (".dockerignore", "*.log\n".to_string()),
    ]
}

fn context(tb: &TestBuilder, name: &str, run_line: &str) -> std::path::PathBuf {
    let files = app_files(run_line);
    let refs: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
    tb.context(name, &refs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bakes_launches_and_reuses_cached_steps() {
    let tb = TestBuilder::new();
    let ctx = context(
        &tb,
        "app",
        "RUN echo \"$GREETING built\" > built.txt && cat /etc/app/config.txt",
    );

    let started = Instant::now();
    let first = tb.builder.build(BuildSpec::new("app", &ctx)).await.unwrap();
    let first_time = started.elapsed();
    assert_eq!(
        first.status,
        ImageStatus::Successful,
        "{:?}\n{:?}",
        first.reason,
        first.log_tail
    );
    assert_eq!(first.runtime.exposed_ports, vec![8080]);
    assert_eq!(first.runtime.workdir, "/srv/app");
    assert!(first.steps.iter().all(|s| !s.cached));
    let log =
        std::fs::read_to_string(tb.builder.build_dir("app", &first.id).join("build.log")).unwrap();
    assert!(
        log.contains("Step 6/8 : RUN echo") && log.contains("[6] setting=1"),
        "{log}"
    );

    // A microVM launched from the image answers on its app port, with the build's files.
    let template = Template::open(first.template.as_ref().unwrap()).unwrap();
    let vm = kiln_testkit::launch_from(&template, tb.scratch.path(), "app-clone").await;
    let page = vm
        .agent()
        .http(kiln_image::build::hook_get(8080, "/index.html"))
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&page.body),
        "hello from /srv/app as 0\n"
    );
    assert_eq!(vm.ok("cat /srv/app/built.txt").await, "hello built\n");
    assert_eq!(vm.ok("cat /srv/app/lib/data.txt").await, "data\n");
    assert_eq!(
        vm.ok("stat -c %U:%G /etc/app/config.txt").await.trim(),
        "nobody:nogroup"
    );
    assert!(
        vm.sh("test -e /srv/app/ignored.log")
            .await
            .unwrap()
            .status
            .code
            != Some(0),
        ".dockerignore honoured"
    );
    vm.destroy().await;

    // Rebuilding the unchanged Dockerfile reuses every step.
    let started = Instant::now();
    let again = tb.builder.build(BuildSpec::new("app", &ctx)).await.unwrap();
    let cached_time = started.elapsed();
    assert_eq!(again.status, ImageStatus::Successful, "{:?}", again.reason);
    assert!(again.steps.iter().all(|s| s.cached), "{:?}", again.steps);
    assert_eq!(
        again.template, first.template,
        "an identical image reuses the template without booting"
    );
    eprintln!("bake {first_time:?} vs fully cached rebuild {cached_time:?}");

    // Changing one line reruns from that line on; the steps before stay cached.
    let changed = context(&tb, "app", "RUN echo \"$GREETING rebuilt\" > built.txt");
    let partial = tb
        .builder
        .build(BuildSpec::new("app", &changed))
        .await
        .unwrap();
    assert_eq!(
        partial.status,
        ImageStatus::Successful,
        "{:?}",
        partial.reason
    );
    let cached: Vec<bool> = partial.steps.iter().map(|s| s.cached).collect();
    assert_eq!(
        cached,
        vec![true, true, true, true, true, false, false, false]
    );

    // Build args reach RUN steps and change the key.
    let mut with_arg = BuildSpec::new("app", &changed);
    with_arg.build_args.insert("GREETING".into(), "hi".into());
    let argued = tb.builder.build(with_arg).await.unwrap();
    assert_eq!(argued.status, ImageStatus::Successful);
    assert!(!argued.steps[5].cached);
    assert!(tb.stray_layers().is_empty(), "{:?}", tb.stray_layers());

    // A larger disk than the base's 64 MiB: the guest grows its filesystem to fill it.
    let big = tb.context(
        "big",
        &[(
            "Dockerfile",
            "FROM busybox\nRUN dd if=/dev/zero of=/fill bs=1M count=200 && df -m / | tail -1\n",
        )],
    );
    let mut spec = BuildSpec::new("big", &big);
    spec.disk_mib = Some(512);
    let grown = tb.builder.build(spec).await.unwrap();
    assert_eq!(
        grown.status,
        ImageStatus::Successful,
        "{:?}\n{:?}",
        grown.reason,
        grown.log_tail
    );
}

async fn failed(tb: &TestBuilder, name: &str, spec: BuildSpec) -> String {
    let record = tb.builder.build(spec).await.unwrap();
    assert_eq!(record.status, ImageStatus::Failed, "{name} should fail");
    assert!(record.template.is_none());
    let dir = tb.builder.build_dir(&record.name, &record.id);
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec!["build.log", "image.json"],
        "{name}: nothing half-made survives"
    );
    assert!(
        tb.stray_layers().is_empty(),
        "{name}: {:?}",
        tb.stray_layers()
    );
    format!(
        "{}\n{}",
        record.reason.unwrap_or_default(),
        record.log_tail.unwrap_or_default()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_fail_clearly_and_leave_nothing_behind() {
    let tb = TestBuilder::new();
    let simple = |df: &str| {
        vec![
            ("Dockerfile", df.to_string()),
            ("start.sh", START_SH.to_string()),
        ]
    };
    let ctx = |tb: &TestBuilder, name: &str, df: &str| {
        let files = simple(df);
        let refs: Vec<(&str, &str)> = files.iter().map(|(p, c)| (*p, c.as_str())).collect();
        tb.context(name, &refs)
    };

    // Rejected before any VM starts.
    let r = failed(
        &tb,
        "syntax",
        BuildSpec::new(
            "bad",
            &ctx(
                &tb,
                "syntax",
                "FROM busybox\nRUN true\nHEALTHCHECK CMD true\n",
            ),
        ),
    )
    .await;
    assert!(r.contains("line 3") && r.contains("HEALTHCHECK"), "{r}");
    let r = failed(
        &tb,
        "missing",
        BuildSpec::new(
            "bad",
            &ctx(&tb, "missing", "FROM busybox\nCOPY nothere.txt /x\n"),
        ),
    )
    .await;
    assert!(
        r.contains("line 2") && r.contains("nothere.txt") && r.contains("not in the build context"),
        "{r}"
    );
    let r = failed(
        &tb,
        "remote",
        BuildSpec::new(
            "bad",
            &ctx(
                &tb,
                "remote",
                "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n",
            ),
        ),
    )
    .await;
    assert!(
        r.contains("cannot pull") && r.contains("kiln image import"),
        "{r}"
    );
    let mut small = BuildSpec::new("bad", &ctx(&tb, "big", "FROM busybox\n"));
    small.limits.max_total_bytes = 100;
    let r = failed(&tb, "too large", small).await;
    assert!(r.contains("limit"), "{r}");
    assert!(tb
        .builder
        .build(BuildSpec {
            memory_mib: 64,
            ..BuildSpec::new("bad", &ctx(&tb, "mem", "FROM busybox\n"))
        })
        .await
        .is_err());

    // Fail inside the build VM.
    let r = failed(
        &tb,
        "run",
        BuildSpec::new(
            "bad",
            &ctx(
                &tb,
                "run",
                "FROM busybox\nRUN echo about to fail && exit 3\n",
            ),
        ),
    )
    .await;
    assert!(
        r.contains("Step 1") && r.contains("exit code 3") && r.contains("about to fail"),
        "{r}"
    );
    let r = failed(
        &tb,
        "disk",
        BuildSpec::new(
            "bad",
            &ctx(
                &tb,
                "disk",
                "FROM busybox\nRUN dd if=/dev/zero of=/fill bs=1M count=200\n",
            ),
        ),
    )
    .await;
    assert!(r.contains("disk filled up"), "{r}");
    let r = failed(
        &tb,
        "app exits",
        BuildSpec::new(
            "bad",
            &ctx(
                &tb,
                "exits",
                "FROM busybox\nCMD echo bye from app; exit 4\n",
            ),
        ),
    )
    .await;
    assert!(
        r.contains("exited before /ready")
            && r.contains("exit code 4")
            && r.contains("bye from app"),
        "{r}"
    );
    let mut never = BuildSpec::new(
        "bad",
        &ctx(&tb, "never", "FROM busybox\nCMD [\"sleep\", \"1000\"]\n"),
    );
    never.ready_timeout = Duration::from_secs(3);
    let r = failed(&tb, "never ready", never).await;
    assert!(
        r.contains("/ready") && r.contains("9000") && r.contains("3s"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_root_filesystem_is_a_base_for_from() {
    let tb = TestBuilder::new();
    // A tiny root filesystem tarball, like one exported from another tool.
    let tar_path = tb.scratch.path().join("rootfs.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        b.append_path_with_name("/bin/busybox", "bin/busybox")
            .unwrap();
        for applet in ["sh", "cat", "echo", "sleep", "sync", "mkdir", "httpd"] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, format!("bin/{applet}"), "busybox")
                .unwrap();
        }
        let os = b"NAME=\"imported root\"\n";
        let mut h = tar::Header::new_gnu();
        h.set_size(os.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "etc/os-release", &os[..]).unwrap();
        b.finish().unwrap();
    }
    let name = format!("test-import-{}", std::process::id());
    let assets = kiln_testkit::assets();
    let base = kiln_image::base::import(&assets, &name, &tar_path)
        .await
        .unwrap();
    assert!(base.disk.is_file());
    let ctx = tb.context(
        "imported",
        &[(
            "Dockerfile",
            &format!("FROM {name}\nRUN cat /etc/os-release\n"),
        )],
    );
    let record = tb
        .builder
        .build(BuildSpec::new("imported", &ctx))
        .await
        .unwrap();
    let _ = std::fs::remove_file(&base.disk);
    let _ = std::fs::remove_file(base.disk.with_extension("key"));
    assert_eq!(
        record.status,
        ImageStatus::Successful,
        "{:?}\n{:?}",
        record.reason,
        record.log_tail
    );
    let log = std::fs::read_to_string(
        tb.builder
            .build_dir("imported", &record.id)
            .join("build.log"),
    )
    .unwrap();
    assert!(log.contains("[1] NAME=\"imported root\""), "{log}");
    // Reserved and malformed names are refused.
    assert!(kiln_image::base::import(&assets, "busybox", &tar_path)
        .await
        .is_err());
    assert!(kiln_image::base::import(&assets, "../x", &tar_path)
        .await
        .is_err());
}
