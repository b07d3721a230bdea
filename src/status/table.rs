//! The status table (`kubectl get`-style columns) and the JSON list, as plain text from rows.
use jiff::{SignedDuration, Timestamp};

use super::row::Row;

pub const COLUMNS: [&str; 10] = [
    "NODE",
    "INSTANCE",
    "NODEGROUP",
    "PHASE",
    "REPLACEMENT",
    "TAINTED",
    "AGE",
    "READY",
    "AGENT",
    "REASON",
];

/// The table of `rows` (in the order given), header first; columns padded to their widest cell,
/// REASON last and unpadded. Every line ends with a newline.
pub fn render_table(rows: &[Row], now: Timestamp) -> String {
    let cells: Vec<[String; 10]> = rows.iter().map(|row| cells(row, now)).collect();
    let header = COLUMNS.map(str::to_owned);
    let mut widths = [0; 10];
    for line in std::iter::once(&header).chain(&cells) {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&cells) {
        let mut text = String::new();
        for (index, cell) in line.iter().enumerate() {
            if index + 1 == line.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[index]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn cells(row: &Row, now: Timestamp) -> [String; 10] {
    let dash = || "-".to_owned();
    [
        row.node.clone(),
        row.instance.clone().unwrap_or_else(dash),
        row.nodegroup.clone().unwrap_or_else(dash),
        row.state.label(),
        row.replacement_cell(),
        row.taint_effect.clone().unwrap_or_else(|| "no".to_owned()),
        row.since()
            .map(|since| human_age(now.duration_since(since)))
            .unwrap_or_else(dash),
        if row.ready { "yes" } else { "no" }.to_owned(),
        row.agent.label().to_owned(),
        row.reason().unwrap_or_default(),
    ]
}

/// `-o json`: the rows as a JSON array, pretty-printed, with a trailing newline.
pub fn render_json(rows: &[Row], now: Timestamp) -> String {
    let rows: Vec<_> = rows.iter().map(|row| row.to_json(now)).collect();
    // Serializing plain structs of strings, numbers and timestamps cannot fail.
    let mut text = serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".to_owned());
    text.push('\n');
    text
}

/// An age as `kubectl get` shows one: `45s`, `3m12s`, `25m`, `5h8m`, `36h`, `3d4h`, `12d`. A negative
/// age (a clock ahead of this one) shows as `0s`.
pub fn human_age(age: SignedDuration) -> String {
    let seconds = age.as_secs().max(0);
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86_400);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => match s % 60 {
            0 => format!("{minutes}m"),
            rest => format!("{minutes}m{rest}s"),
        },
        s if s < 3 * 3600 => format!("{minutes}m"),
        s if s < 8 * 3600 => match minutes % 60 {
            0 => format!("{hours}h"),
            rest => format!("{hours}h{rest}m"),
        },
        s if s < 48 * 3600 => format!("{hours}h"),
        s if s < 8 * 86_400 => match hours % 24 {
            0 => format!("{days}d"),
            rest => format!("{days}d{rest}h"),
        },
        _ => format!("{days}d"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::row::{
        Agent, Keys,
        tests::{node, record},
    };
    use super::*;
    use crate::contract::keys;
    use serde_json::json;

    fn now() -> Timestamp {
        "2026-11-25T10:03:12Z".parse().unwrap()
    }

    #[test]
    fn ages_read_like_kubectl() {
        let age = |s: i64| human_age(SignedDuration::from_secs(s));
        assert_eq!(age(-5), "0s");
        assert_eq!(age(45), "45s");
        assert_eq!(age(119), "119s");
        assert_eq!(age(192), "3m12s");
        assert_eq!(age(300), "5m");
        assert_eq!(age(25 * 60 + 7), "25m");
        assert_eq!(age(5 * 3600 + 8 * 60), "5h8m");
        assert_eq!(age(36 * 3600), "36h");
        assert_eq!(age(3 * 86_400 + 4 * 3600), "3d4h");
        assert_eq!(age(12 * 86_400), "12d");
    }

    #[test]
    fn the_table_has_every_column_aligned() {
        let tainted = node(
            "ip-10-0-0-1.ec2.internal",
            json!({keys::REBALANCE_NOTICE_TIME: "2026-11-25T10:00:00Z"}),
            Some("NoSchedule"),
            true,
        );
        let tainted_record = record(
            "ip-10-0-0-1.ec2.internal",
            "Tainted",
            json!({"replacementInstance": "i-0new", "replacementNode": "ip-10-0-0-9.ec2.internal"}),
        );
        let skipped = node("n2", json!({}), None, false);
        let skipped_record = record("n2", "Skipped", json!({"reason": "i-0old is in no ASG"}));
        let rows = [
            Row {
                agent: Agent::Ready,
                ..Row::from_node(&tainted, Some(&tainted_record), &Keys::default())
            },
            Row {
                agent: Agent::Missing,
                ..Row::from_node(&skipped, Some(&skipped_record), &Keys::default())
            },
        ];
        let table = render_table(&rows, now());
        let expected = "\
NODE                       INSTANCE   NODEGROUP   PHASE     REPLACEMENT                TAINTED      AGE     READY   AGENT   REASON
ip-10-0-0-1.ec2.internal   i-0old     spot-a      Tainted   ip-10-0-0-9.ec2.internal   NoSchedule   3m12s   yes     yes
n2                         i-0old     spot-a      Skipped   -                          no           3m11s   no      none    i-0old is in no ASG
";
        assert_eq!(table, expected, "\n{table}");
    }

    #[test]
    fn no_rows_is_just_the_header() {
        assert_eq!(render_table(&[], now()).lines().count(), 1);
    }

    #[test]
    fn json_carries_the_row_and_the_whole_record() {
        let noticed = node(
            "n1",
            json!({keys::REBALANCE_NOTICE_TIME: "2026-11-25T10:00:00Z"}),
            None,
            true,
        );
        let scaling = record(
            "n1",
            "ScalingSpot",
            json!({"asg": "spot-a", "capacityType": "spot", "baseline": 2, "targetDesired": 3,
                   "preScaleInstances": ["i-0old"], "scaleRequestedAt": "2026-11-25T10:00:02Z"}),
        );
        let text = render_json(
            &[Row::from_node(&noticed, Some(&scaling), &Keys::default())],
            now(),
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let row = &value[0];
        assert_eq!(row["node"], "n1");
        assert_eq!(row["phase"], "ScalingSpot");
        assert_eq!(row["ageSeconds"], 192);
        assert_eq!(row["taintEffect"], serde_json::Value::Null);
        assert_eq!(row["record"]["targetDesired"], 3);
        assert_eq!(row["record"]["asg"], "spot-a");
    }
}
