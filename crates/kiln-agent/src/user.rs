//! Resolves `name`, `uid`, `uid:gid` or `name:group` against the guest's /etc/passwd and
//! /etc/group (parsed directly: a static binary has no NSS).

use kiln_proto::{ErrorKind, GuestError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    /// Supplementary groups: those /etc/group lists the user in (by name).
    pub groups: Vec<u32>,
}

impl Identity {
    pub fn root() -> Identity {
        Identity {
            uid: 0,
            gid: 0,
            home: "/root".into(),
            groups: Vec::new(),
        }
    }
}

pub fn resolve(spec: Option<&str>) -> Result<Identity, GuestError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_in(spec, &passwd, &group)
}

fn resolve_in(spec: Option<&str>, passwd: &str, group: &str) -> Result<Identity, GuestError> {
    let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(Identity::root());
    };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == user_part || f[2] == user_part));
    let name = entry.as_ref().map(|f| f[0].to_string());
    let (uid, mut gid, home) = match (entry, user_part.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| bad(format!("corrupt /etc/passwd entry for {user_part}")))?,
            f[3].parse()
                .map_err(|_| bad(format!("corrupt /etc/passwd entry for {user_part}")))?,
            f[5].to_string(),
        ),
        (None, Ok(uid)) => (uid, uid, "/".to_string()),
        (None, Err(_)) => {
            return Err(GuestError::new(
                ErrorKind::NotFound,
                format!("no user {user_part:?} in /etc/passwd"),
            ))
        }
    };
    if let Some(g) = group_part {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    GuestError::new(ErrorKind::NotFound, format!("no group {g:?} in /etc/group"))
                })?,
        };
    }
    let groups = name.map_or_else(Vec::new, |n| member_of(&n, group));
    Ok(Identity {
        uid,
        gid,
        home,
        groups,
    })
}

/// The gids whose /etc/group member list names `user`.
fn member_of(user: &str, group: &str) -> Vec<u32> {
    group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m.trim() == user))
        .filter_map(|f| f[2].parse().ok())
        .collect()
}

fn bad(message: String) -> GuestError {
    GuestError::new(ErrorKind::InvalidRequest, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\nwheel:x:10:root,app\n";

    #[test]
    fn resolves_names_numbers_and_groups() {
        assert_eq!(resolve_in(None, PASSWD, GROUP).unwrap(), Identity::root());
        let app = resolve_in(Some("app"), PASSWD, GROUP).unwrap();
        assert_eq!(
            (app.uid, app.gid, app.home.as_str()),
            (1000, 1001, "/home/app")
        );
        let by_uid = resolve_in(Some("1000"), PASSWD, GROUP).unwrap();
        assert_eq!(by_uid.gid, 1001);
        assert_eq!(app.groups, vec![10]);
        let unknown_uid = resolve_in(Some("4242:7"), PASSWD, GROUP).unwrap();
        assert_eq!((unknown_uid.uid, unknown_uid.gid), (4242, 7));
        assert_eq!(
            resolve_in(Some("app:staff"), PASSWD, GROUP).unwrap().gid,
            50
        );
    }

    #[test]
    fn unknown_names_are_not_found() {
        assert_eq!(
            resolve_in(Some("nobody"), PASSWD, GROUP).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            resolve_in(Some("app:nogroup"), PASSWD, GROUP)
                .unwrap_err()
                .kind,
            ErrorKind::NotFound
        );
    }
}
