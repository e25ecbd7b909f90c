//! Webhook bodies, one builder per forge and event, shaped as the forges'
//! documentation gives them. What a CI reads (clone URLs, full name or
//! project path, `ref`, `before`/`after`, pull request number, head sha and
//! ref, action, GitLab's `checkout_sha`, `object_attributes.iid`,
//! `last_commit.id`, `source_branch`, `oldrev`) is exact; users, times and
//! commit details are representative. Pure: no IO.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::model::{ForgeKind, Repo, rfc3339};
use crate::webhook::{HookEvent, PrAction, ZERO_SHA, github_repo, github_user};

/// The JSON body of `event` on `repo`'s forge.
pub(crate) fn body(repo: &Repo, event: &HookEvent, at: SystemTime) -> Value {
    let at = rfc3339::format(at);
    match (repo.kind, event) {
        (_, HookEvent::Other { body, .. }) => body.clone(),
        (
            ForgeKind::GitHub,
            HookEvent::Push {
                git_ref,
                before,
                after,
                commits,
            },
        ) => github_push(repo, git_ref, before, after, commits, &at),
        (ForgeKind::GitHub, HookEvent::DeleteBranch { branch, before }) => github_push(
            repo,
            &format!("refs/heads/{branch}"),
            before,
            ZERO_SHA,
            &[],
            &at,
        ),
        (ForgeKind::GitHub, HookEvent::PullRequest { .. }) => github_pull_request(repo, event, &at),
        (
            ForgeKind::Gitea | ForgeKind::Forgejo,
            HookEvent::Push {
                git_ref,
                before,
                after,
                commits,
            },
        ) => gitea_push(repo, git_ref, before, after, commits, &at),
        (ForgeKind::Gitea | ForgeKind::Forgejo, HookEvent::DeleteBranch { branch, .. }) => json!({
            "ref": branch,
            "ref_type": "branch",
            "pusher_type": "user",
            "repository": gitea_repo(repo),
            "sender": gitea_user(),
        }),
        (ForgeKind::Gitea | ForgeKind::Forgejo, HookEvent::PullRequest { .. }) => {
            gitea_pull_request(repo, event, &at)
        }
        (
            ForgeKind::GitLab,
            HookEvent::Push {
                git_ref,
                before,
                after,
                commits,
            },
        ) => gitlab_push(repo, git_ref, before, after, commits, &at),
        (ForgeKind::GitLab, HookEvent::DeleteBranch { branch, before }) => gitlab_push(
            repo,
            &format!("refs/heads/{branch}"),
            before,
            ZERO_SHA,
            &[],
            &at,
        ),
        (ForgeKind::GitLab, HookEvent::PullRequest { .. }) => {
            gitlab_merge_request(repo, event, &at)
        }
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

fn github_commit(repo: &Repo, sha: &str, at: &str) -> Value {
    let person = json!({"name": "Octo Dev", "email": "octo@example.com", "username": "octo-dev"});
    json!({
        "id": sha,
        "tree_id": sha,
        "distinct": true,
        "message": format!("commit {}", short(sha)),
        "timestamp": at,
        "url": format!("{}/commit/{sha}", repo.web_url),
        "author": person,
        "committer": person,
        "added": [], "removed": [], "modified": ["README.md"],
    })
}

fn github_push(
    repo: &Repo,
    git_ref: &str,
    before: &str,
    after: &str,
    commits: &[String],
    at: &str,
) -> Value {
    let deleted = after == ZERO_SHA;
    let commits: Vec<Value> = commits.iter().map(|c| github_commit(repo, c, at)).collect();
    json!({
        "ref": git_ref,
        "before": before,
        "after": after,
        "created": before == ZERO_SHA,
        "deleted": deleted,
        "forced": false,
        "base_ref": null,
        "compare": format!("{}/compare/{}...{}", repo.web_url, short(before), short(after)),
        "head_commit": if deleted { Value::Null } else { commits.last().cloned().unwrap_or(Value::Null) },
        "commits": commits,
        "repository": github_repo(repo),
        "pusher": {"name": "octo-dev", "email": "octo@example.com"},
        "sender": github_user(),
    })
}

/// The fields of a pull request event, unpacked.
struct Pr<'a> {
    action: PrAction,
    number: u64,
    head_ref: &'a str,
    head_sha: &'a str,
    base_ref: &'a str,
    base_sha: &'a str,
    before: Option<&'a str>,
    head_repo: &'a Repo,
}

fn pr<'a>(repo: &'a Repo, event: &'a HookEvent) -> Pr<'a> {
    let HookEvent::PullRequest {
        action,
        number,
        head_ref,
        head_sha,
        base_ref,
        base_sha,
        before,
        head_repo,
    } = event
    else {
        unreachable!("called for pull request events only")
    };
    Pr {
        action: *action,
        number: *number,
        head_ref,
        head_sha,
        base_ref,
        base_sha,
        before: before.as_deref(),
        head_repo: head_repo.as_deref().unwrap_or(repo),
    }
}

fn github_pull_request(repo: &Repo, event: &HookEvent, at: &str) -> Value {
    let p = pr(repo, event);
    let action = match p.action {
        PrAction::Opened => "opened",
        PrAction::Synchronized => "synchronize",
        PrAction::Reopened => "reopened",
        PrAction::Closed => "closed",
    };
    let side = |r: &Repo, branch: &str, sha: &str| {
        json!({"label": format!("{}:{branch}", r.owner()), "ref": branch, "sha": sha,
               "user": github_user(), "repo": github_repo(r)})
    };
    let mut body = json!({
        "action": action,
        "number": p.number,
        "pull_request": {
            "url": format!("{}/pulls/{}", repo.web_url, p.number),
            "id": 50_000 + p.number,
            "number": p.number,
            "state": if p.action == PrAction::Closed { "closed" } else { "open" },
            "locked": false,
            "title": format!("Change #{}", p.number),
            "user": github_user(),
            "html_url": format!("{}/pull/{}", repo.web_url, p.number),
            "created_at": at,
            "updated_at": at,
            "draft": false,
            "merged": false,
            "head": side(p.head_repo, p.head_ref, p.head_sha),
            "base": side(repo, p.base_ref, p.base_sha),
        },
        "repository": github_repo(repo),
        "sender": github_user(),
    });
    if let Some(before) = p.before {
        body["before"] = json!(before);
        body["after"] = json!(p.head_sha);
    }
    body
}

fn gitea_user() -> Value {
    json!({"id": 7, "login": "dev", "username": "dev", "full_name": "A Developer", "email": "dev@example.com"})
}

fn gitea_repo(repo: &Repo) -> Value {
    json!({
        "id": repo.id,
        "owner": {"id": 2, "login": repo.owner(), "username": repo.owner(), "full_name": "", "email": ""},
        "name": repo.name(),
        "full_name": repo.path,
        "description": "a repository on the fake forge",
        "empty": false,
        "private": false,
        "fork": false,
        "mirror": false,
        "html_url": repo.web_url,
        "ssh_url": repo.ssh_url,
        "clone_url": repo.clone_url,
        "website": "",
        "default_branch": repo.default_branch,
        "archived": false,
    })
}

fn gitea_push(
    repo: &Repo,
    git_ref: &str,
    before: &str,
    after: &str,
    commits: &[String],
    at: &str,
) -> Value {
    let person = json!({"name": "A Developer", "email": "dev@example.com", "username": "dev"});
    let commits: Vec<Value> = commits
        .iter()
        .map(|sha| {
            json!({"id": sha, "message": format!("commit {}\n", short(sha)),
                   "url": format!("{}/commit/{sha}", repo.web_url),
                   "author": person, "committer": person, "verification": null, "timestamp": at,
                   "added": [], "removed": [], "modified": ["README.md"]})
        })
        .collect();
    json!({
        "ref": git_ref,
        "before": before,
        "after": after,
        "compare_url": format!("{}/compare/{before}...{after}", repo.web_url),
        "total_commits": commits.len(),
        "head_commit": commits.last().cloned().unwrap_or(Value::Null),
        "commits": commits,
        "repository": gitea_repo(repo),
        "pusher": gitea_user(),
        "sender": gitea_user(),
    })
}

fn gitea_pull_request(repo: &Repo, event: &HookEvent, at: &str) -> Value {
    let p = pr(repo, event);
    let action = match p.action {
        PrAction::Opened => "opened",
        PrAction::Synchronized => "synchronized",
        PrAction::Reopened => "reopened",
        PrAction::Closed => "closed",
    };
    let side = |r: &Repo, branch: &str, sha: &str| json!({"label": branch, "ref": branch, "sha": sha, "repo_id": r.id, "repo": gitea_repo(r)});
    json!({
        "action": action,
        "number": p.number,
        "pull_request": {
            "id": 50_000 + p.number,
            "url": format!("{}/pulls/{}", repo.web_url, p.number),
            "number": p.number,
            "user": gitea_user(),
            "title": format!("Change #{}", p.number),
            "body": "",
            "state": if p.action == PrAction::Closed { "closed" } else { "open" },
            "html_url": format!("{}/pulls/{}", repo.web_url, p.number),
            "mergeable": true,
            "merged": false,
            "merge_commit_sha": null,
            "base": side(repo, p.base_ref, p.base_sha),
            "head": side(p.head_repo, p.head_ref, p.head_sha),
            "merge_base": p.base_sha,
            "created_at": at,
            "updated_at": at,
        },
        "requested_reviewer": null,
        "repository": gitea_repo(repo),
        "sender": gitea_user(),
        "commit_id": "",
        "review": null,
    })
}

fn gitlab_project(repo: &Repo) -> Value {
    json!({
        "id": repo.id,
        "name": repo.name(),
        "description": "a project on the fake forge",
        "web_url": repo.web_url,
        "avatar_url": null,
        "git_ssh_url": repo.ssh_url,
        "git_http_url": repo.clone_url,
        "namespace": repo.owner(),
        "visibility_level": 20,
        "path_with_namespace": repo.path,
        "default_branch": repo.default_branch,
        "ci_config_path": null,
        "homepage": repo.web_url,
        "url": repo.ssh_url,
        "ssh_url": repo.ssh_url,
        "http_url": repo.clone_url,
    })
}

fn gitlab_repository(repo: &Repo) -> Value {
    json!({
        "name": repo.name(),
        "url": repo.ssh_url,
        "description": "a project on the fake forge",
        "homepage": repo.web_url,
        "git_http_url": repo.clone_url,
        "git_ssh_url": repo.ssh_url,
        "visibility_level": 20,
    })
}

fn gitlab_commit(repo: &Repo, sha: &str, at: &str) -> Value {
    json!({
        "id": sha,
        "message": format!("commit {}\n", short(sha)),
        "title": format!("commit {}", short(sha)),
        "timestamp": at,
        "url": format!("{}/-/commit/{sha}", repo.web_url),
        "author": {"name": "A Developer", "email": "dev@example.com"},
        "added": [], "modified": ["README.md"], "removed": [],
    })
}

fn gitlab_push(
    repo: &Repo,
    git_ref: &str,
    before: &str,
    after: &str,
    commits: &[String],
    at: &str,
) -> Value {
    let tag = git_ref.starts_with("refs/tags/");
    let kind = if tag { "tag_push" } else { "push" };
    let commits: Vec<Value> = commits.iter().map(|c| gitlab_commit(repo, c, at)).collect();
    json!({
        "object_kind": kind,
        "event_name": kind,
        "before": before,
        "after": after,
        "ref": git_ref,
        "ref_protected": git_ref == format!("refs/heads/{}", repo.default_branch),
        "checkout_sha": if after == ZERO_SHA { Value::Null } else { json!(after) },
        "message": null,
        "user_id": 7,
        "user_name": "A Developer",
        "user_username": "dev",
        "user_email": "",
        "user_avatar": null,
        "project_id": repo.id,
        "project": gitlab_project(repo),
        "total_commits_count": commits.len(),
        "commits": commits,
        "push_options": {},
        "repository": gitlab_repository(repo),
    })
}

fn gitlab_merge_request(repo: &Repo, event: &HookEvent, at: &str) -> Value {
    let p = pr(repo, event);
    let (action, state) = match p.action {
        PrAction::Opened => ("open", "opened"),
        PrAction::Synchronized => ("update", "opened"),
        PrAction::Reopened => ("reopen", "opened"),
        PrAction::Closed => ("close", "closed"),
    };
    let mut attributes = json!({
        "id": 90_000 + p.number,
        "iid": p.number,
        "target_branch": p.base_ref,
        "source_branch": p.head_ref,
        "source_project_id": p.head_repo.id,
        "target_project_id": repo.id,
        "author_id": 7,
        "title": format!("Change !{}", p.number),
        "description": "",
        "state": state,
        "merge_status": "can_be_merged",
        "url": format!("{}/-/merge_requests/{}", repo.web_url, p.number),
        "source": gitlab_project(p.head_repo),
        "target": gitlab_project(repo),
        "last_commit": gitlab_commit(p.head_repo, p.head_sha, at),
        "work_in_progress": false,
        "draft": false,
        "created_at": at,
        "updated_at": at,
        "action": action,
    });
    if let (PrAction::Synchronized, Some(before)) = (p.action, p.before) {
        attributes["oldrev"] = json!(before);
    }
    json!({
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"id": 7, "name": "A Developer", "username": "dev", "avatar_url": null, "email": "[REDACTED]"},
        "project": gitlab_project(repo),
        "object_attributes": attributes,
        "labels": [],
        "changes": {},
        "repository": gitlab_repository(repo),
    })
}
