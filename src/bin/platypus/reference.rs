//! `platypus reference`: every subcommand and flag as Markdown, generated
//! from the clap definitions. README's "Command line reference" is this
//! output, and `tests/readme.rs` fails when the two differ.

use std::fmt::Write as _;

use std::path::PathBuf;

use clap::builder::{PossibleValue, ValueParser};
use clap::{value_parser, Arg, ArgAction, Command};

/// The reference of `cli`'s subcommands: a heading, what it does, and a table
/// of its flags (value, default, meaning) each.
pub fn markdown(cli: &Command) -> String {
    let mut out = String::new();
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        let about = sub.get_long_about().or(sub.get_about());
        let _ = writeln!(out, "### `platypus {}`\n", sub.get_name());
        let _ = writeln!(
            out,
            "{}\n",
            cell(&about.map(|s| s.to_string()).unwrap_or_default())
        );
        let args: Vec<&Arg> = sub
            .get_arguments()
            .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
            .collect();
        if args.is_empty() {
            continue;
        }
        out.push_str("| flag | value | default | meaning |\n|---|---|---|---|\n");
        for arg in args {
            let choice = sub
                .get_groups()
                .find(|g| g.is_required_set() && g.get_args().any(|a| a == arg.get_id()));
            let default = match choice {
                Some(group) => {
                    let names: Vec<String> = group
                        .get_args()
                        .filter_map(|id| sub.get_arguments().find(|a| a.get_id() == id))
                        .map(flag)
                        .collect();
                    format!("one of {} required", names.join(", "))
                }
                None => default(arg),
            };
            let help = arg.get_long_help().or(arg.get_help());
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                flag(arg),
                value(arg),
                default,
                cell(&help.map(|s| s.to_string()).unwrap_or_default())
            );
        }
        out.push('\n');
    }
    out
}

/// `--name` (positional arguments by their value name).
fn flag(arg: &Arg) -> String {
    match arg.get_long() {
        Some(long) => format!("`--{long}`"),
        None => format!("`{}`", arg.get_id().as_str().to_uppercase()),
    }
}

/// The value a flag takes: its choices, or its value name; "—" for a switch.
fn value(arg: &Arg) -> String {
    if !arg.get_action().takes_values() {
        return "—".into();
    }
    let choices: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(PossibleValue::get_name)
        .map(str::to_string)
        .collect();
    let id = arg.get_id().as_str().to_uppercase();
    let named = arg
        .get_value_names()
        .map(|n| n.join(" "))
        .filter(|n| *n != id);
    let one = if !choices.is_empty() {
        choices.join(" \\| ")
    } else {
        named.unwrap_or_else(|| kind(arg).into())
    };
    let repeat = matches!(arg.get_action(), ArgAction::Append);
    match (repeat, arg.get_value_delimiter()) {
        (_, Some(d)) => format!("{one}[{d}{one}…]"),
        (true, None) => format!("{one} (repeatable)"),
        _ => one,
    }
}

/// What a flag's value is, from the type it parses to.
fn kind(arg: &Arg) -> &'static str {
    let id = arg.get_value_parser().type_id();
    let is = |parser: ValueParser| parser.type_id() == id;
    if is(value_parser!(PathBuf)) {
        "PATH"
    } else if [
        value_parser!(usize).into(),
        value_parser!(u64).into(),
        value_parser!(u32).into(),
    ]
    .into_iter()
    .any(is)
    {
        "N"
    } else if is(value_parser!(f32).into()) || is(value_parser!(f64).into()) {
        "X"
    } else {
        "TEXT"
    }
}

/// The default, "required", or empty.
fn default(arg: &Arg) -> String {
    if arg.is_required_set() {
        return "required".into();
    }
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if defaults.is_empty() || !arg.get_action().takes_values() {
        String::new()
    } else {
        format!("`{}`", defaults.join(","))
    }
}

/// Text fit for one table cell: one line, `|` escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}
