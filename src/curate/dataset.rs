//! Training rows and benchmark items from JSONL, JSON (an array of objects),
//! CSV or Parquet files, the format told by the extension (`.jsonl`,
//! `.json`, `.csv`, `.parquet`).
//!
//! A [`Table`] keeps every row as it was read (its JSONL line, JSON element,
//! CSV record or Parquet row), so a subset of it is written back in the same
//! format, fields and order ([`Table::write_rows`]). Errors are
//! [`Error::File`]s naming the file, the row ("line N" in JSONL, "element N"
//! in JSON, "row N" in CSV, counted from 1 after the header, and in Parquet)
//! and the field.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch, UInt64Array};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::llama::data::{json_object, string};
use crate::{Error, Result};

/// The file formats read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line (blank lines skipped).
    Jsonl,
    /// One JSON array of objects.
    Json,
    /// A header row, then one record per row; every field is a string.
    Csv,
    /// Apache Parquet: string columns (plain or dictionary-encoded) and
    /// lists of strings are text; numbers and booleans are read as such.
    Parquet,
}

impl Format {
    /// The format of `path`, by its extension.
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext.to_ascii_lowercase().as_str() {
            "jsonl" => Ok(Format::Jsonl),
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "parquet" => Ok(Format::Parquet),
            _ => Err(file_error(
                path,
                format!("has extension {ext:?}; expected .jsonl, .json, .csv or .parquet"),
            )),
        }
    }
}

/// One row: its fields, and its text as read (for writing it back).
#[derive(Debug, Clone)]
struct Row {
    /// Where it is in the file, for messages ("line 3").
    place: String,
    fields: Map<String, Value>,
    raw: Raw,
}

#[derive(Debug, Clone)]
enum Raw {
    /// A JSONL line or a JSON array element, verbatim.
    Json(String),
    /// A CSV record.
    Csv(csv::StringRecord),
    /// A row of [`Table::parquet`], the same index as in the table.
    Parquet,
}

/// The rows of one file, as read.
#[derive(Debug, Clone)]
pub struct Table {
    path: PathBuf,
    format: Format,
    /// The CSV header.
    header: Option<csv::StringRecord>,
    /// Every row of a Parquet file, its schema and metadata as read.
    parquet: Option<RecordBatch>,
    rows: Vec<Row>,
}

impl Table {
    /// Reads every row of `path`; a file without rows is an error.
    pub fn read(path: &Path) -> Result<Table> {
        let format = Format::of(path)?;
        let fail = |what: String| file_error(path, what);
        let text = || std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")));
        let (mut header, mut parquet) = (None, None);
        let rows = match format {
            Format::Jsonl => jsonl_rows(&text()?).map_err(fail)?,
            Format::Json => json_rows(&text()?).map_err(fail)?,
            Format::Csv => {
                let (head, rows) = csv_rows(&text()?).map_err(fail)?;
                header = Some(head);
                rows
            }
            Format::Parquet => {
                let (batch, rows) = parquet_rows(path).map_err(fail)?;
                parquet = Some(batch);
                rows
            }
        };
        if rows.is_empty() {
            return Err(fail("has no rows".into()));
        }
        Ok(Table {
            path: path.to_path_buf(),
            format,
            header,
            parquet,
            rows,
        })
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows (never, for a table that was read).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The fields of row `i`.
    pub fn fields(&self, i: usize) -> &Map<String, Value> {
        &self.rows[i].fields
    }

    /// The string field `field` of row `i` (`None` when absent or null);
    /// any other value is an error naming the file, row and field.
    pub fn string(&self, i: usize, field: &str) -> Result<Option<&str>> {
        string(&self.rows[i].fields, field).map_err(|what| self.row_error(i, what))
    }

    /// [`Table::string`], required.
    pub fn required(&self, i: usize, field: &str) -> Result<&str> {
        self.string(i, field)?
            .ok_or_else(|| self.row_error(i, format!("has no \"{field}\"")))
    }

    /// The text of `fields` of row `i` joined with " ": a string, or a list
    /// of strings joined with " "; empty and absent fields are left out
    /// (absent is an error unless the field is in `optional`).
    pub fn text(&self, i: usize, fields: &[String], optional: &[&str]) -> Result<String> {
        let mut parts = Vec::new();
        for field in fields {
            match self.rows[i].fields.get(field.as_str()) {
                None | Some(Value::Null) if optional.contains(&field.as_str()) => {}
                None | Some(Value::Null) => {
                    return Err(self.row_error(i, format!("has no \"{field}\"")))
                }
                Some(Value::String(s)) => parts.push(s.as_str()),
                Some(Value::Array(items)) => {
                    for (k, item) in items.iter().enumerate() {
                        parts.push(item.as_str().ok_or_else(|| {
                            self.row_error(
                                i,
                                format!("\"{field}\"[{k}] is {item}, expected a string"),
                            )
                        })?);
                    }
                }
                Some(other) => {
                    return Err(self.row_error(
                        i,
                        format!("\"{field}\" is {other}, expected a string or a list of strings"),
                    ))
                }
            }
        }
        parts.retain(|p| !p.is_empty());
        Ok(parts.join(" "))
    }

    /// An [`Error::File`] about row `i`.
    pub fn row_error(&self, i: usize, what: String) -> Error {
        file_error(&self.path, format!("{}: {what}", self.rows[i].place))
    }

    /// Writes the rows `rows` (indices, in the order given) in the table's
    /// format: JSONL lines and JSON elements as read, CSV records under the
    /// header, Parquet rows with the file's schema and metadata (Snappy
    /// compressed).
    pub fn write_rows(&self, rows: &[usize], out: &mut dyn Write) -> io::Result<()> {
        let raw = |i: usize| &self.rows[i].raw;
        if let Some(batch) = &self.parquet {
            return write_parquet(batch, rows, out);
        }
        match (self.format, &self.header) {
            (Format::Csv, Some(header)) => {
                let mut w = csv::Writer::from_writer(out);
                w.write_record(header)?;
                for &i in rows {
                    if let Raw::Csv(record) = raw(i) {
                        w.write_record(record)?;
                    }
                }
                w.flush()
            }
            (Format::Json, _) => {
                out.write_all(b"[")?;
                for (n, &i) in rows.iter().enumerate() {
                    if let Raw::Json(text) = raw(i) {
                        let sep = if n == 0 { "\n" } else { ",\n" };
                        write!(out, "{sep}{text}")?;
                    }
                }
                out.write_all(b"\n]\n")
            }
            _ => {
                for &i in rows {
                    if let Raw::Json(text) = raw(i) {
                        writeln!(out, "{text}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

fn file_error(path: &Path, what: String) -> Error {
    Error::File {
        path: path.to_path_buf(),
        what,
    }
}

fn jsonl_rows(text: &str) -> std::result::Result<Vec<Row>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            let place = format!("line {}", n + 1);
            let fields = json_object(line).map_err(|e| format!("{place}: {e}"))?;
            Ok(Row {
                place,
                fields,
                raw: Raw::Json(line.trim_end().to_string()),
            })
        })
        .collect()
}

fn json_rows(text: &str) -> std::result::Result<Vec<Row>, String> {
    let items: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON array of objects: {e}"))?;
    items
        .into_iter()
        .enumerate()
        .map(|(n, item)| {
            let place = format!("element {}", n + 1);
            let fields = json_object(item.get()).map_err(|e| format!("{place}: {e}"))?;
            Ok(Row {
                place,
                fields,
                raw: Raw::Json(item.get().to_string()),
            })
        })
        .collect()
}

fn csv_rows(text: &str) -> std::result::Result<(csv::StringRecord, Vec<Row>), String> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| format!("no CSV header: {e}"))?
        .clone();
    let rows = reader
        .records()
        .enumerate()
        .map(|(n, record)| {
            let place = format!("row {}", n + 1);
            let record = record.map_err(|e| format!("{place}: {e}"))?;
            let fields = header
                .iter()
                .zip(record.iter())
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect();
            Ok(Row {
                place,
                fields,
                raw: Raw::Csv(record),
            })
        })
        .collect::<std::result::Result<_, String>>()?;
    Ok((header, rows))
}

/// Reads every row of a Parquet file as one batch, and each row's fields as
/// JSON values.
fn parquet_rows(path: &Path) -> std::result::Result<(RecordBatch, Vec<Row>), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let not_parquet =
        |e: parquet::errors::ParquetError| format!("not a readable Parquet file: {e}");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(not_parquet)?;
    let schema = reader.schema().clone();
    let batches = reader
        .build()
        .map_err(not_parquet)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("not a readable Parquet file: {e}"))?;
    let batch = arrow_select::concat::concat_batches(&schema, &batches)
        .map_err(|e| format!("cannot join its row groups: {e}"))?;
    let columns: Vec<(String, Vec<Value>)> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| (field.name().clone(), values(column.as_ref())))
        .collect();
    let rows = (0..batch.num_rows())
        .map(|i| Row {
            place: format!("row {}", i + 1),
            fields: columns
                .iter()
                .map(|(name, values)| (name.clone(), values[i].clone()))
                .collect(),
            raw: Raw::Parquet,
        })
        .collect();
    Ok((batch, rows))
}

/// The values of an Arrow column as JSON: strings, lists, numbers,
/// booleans and nulls; any other type as `{"parquet type": "…"}`, which
/// [`Table::text`] refuses by name.
fn values(column: &dyn Array) -> Vec<Value> {
    fn each<T: Into<Value>>(column: &dyn Array, value: impl Fn(usize) -> T) -> Vec<Value> {
        (0..column.len())
            .map(|i| match column.is_null(i) {
                true => Value::Null,
                false => value(i).into(),
            })
            .collect()
    }
    fn float(x: f64) -> Value {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
    fn lists<O: arrow_array::OffsetSizeTrait>(column: &dyn Array) -> Vec<Value> {
        let list = column.as_list::<O>();
        each(column, |i| values(list.value(i).as_ref()))
    }
    macro_rules! ints {
        ($($dtype:ident => $ty:ty),*) => {
            match column.data_type() {
                $(DataType::$dtype => return each(column, |i| column.as_primitive::<$ty>().value(i)),)*
                _ => {}
            }
        };
    }
    ints!(Int8 => Int8Type, Int16 => Int16Type, Int32 => Int32Type, Int64 => Int64Type,
          UInt8 => UInt8Type, UInt16 => UInt16Type, UInt32 => UInt32Type, UInt64 => UInt64Type);
    match column.data_type() {
        DataType::Null => vec![Value::Null; column.len()],
        DataType::Utf8 => each(column, |i| column.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => each(column, |i| column.as_string::<i64>().value(i)),
        DataType::Utf8View => each(column, |i| column.as_string_view().value(i)),
        DataType::Boolean => each(column, |i| column.as_boolean().value(i)),
        DataType::Float32 => each(column, |i| {
            float(column.as_primitive::<Float32Type>().value(i) as f64)
        }),
        DataType::Float64 => each(column, |i| {
            float(column.as_primitive::<Float64Type>().value(i))
        }),
        DataType::List(_) => lists::<i32>(column),
        DataType::LargeList(_) => lists::<i64>(column),
        DataType::Dictionary(..) => {
            let dictionary = column.as_any_dictionary();
            let words = values(dictionary.values().as_ref());
            let keys = dictionary.normalized_keys();
            each(column, |i| words[keys[i]].clone())
        }
        other => {
            let kind = Value::Object(Map::from_iter([(
                "parquet type".to_string(),
                Value::String(other.to_string()),
            )]));
            vec![kind; column.len()]
        }
    }
}

/// Writes the rows `rows` of `batch` as a Parquet file with its schema.
fn write_parquet(batch: &RecordBatch, rows: &[usize], out: &mut dyn Write) -> io::Result<()> {
    let indices = UInt64Array::from_iter_values(rows.iter().map(|&i| i as u64));
    let kept = arrow_select::take::take_record_batch(batch, &indices).map_err(io::Error::other)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), Some(properties))
        .map_err(io::Error::other)?;
    writer.write(&kept).map_err(io::Error::other)?;
    writer.close().map_err(io::Error::other)?;
    out.write_all(&bytes)
}

/// One training row (Open-Platypus' fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainRow {
    /// The instruction.
    pub instruction: String,
    /// The input, empty when absent.
    pub input: String,
    /// The output.
    pub output: String,
    /// Where the row came from, when the file says.
    pub data_source: Option<String>,
    /// The text embedded for it ([`read_train`]'s `text_fields`).
    pub text: String,
}

/// The fields a training row may lack.
const OPTIONAL: [&str; 2] = ["input", "data_source"];

/// A training file: its [`Table`] and its rows.
#[derive(Debug, Clone)]
pub struct TrainSet {
    /// The file as read.
    pub table: Table,
    /// One per table row.
    pub rows: Vec<TrainRow>,
}

/// Reads a training file: every row has a string `instruction` and
/// `output`, and may have `input` and `data_source`; its text is its
/// `text_fields` joined with " " (`["instruction", "input"]` by default;
/// an empty input is left out).
pub fn read_train(path: &Path, text_fields: &[String]) -> Result<TrainSet> {
    let table = Table::read(path)?;
    let rows = (0..table.len())
        .map(|i| {
            Ok(TrainRow {
                instruction: table.required(i, "instruction")?.to_string(),
                input: table.string(i, "input")?.unwrap_or("").to_string(),
                output: table.required(i, "output")?.to_string(),
                data_source: table
                    .string(i, "data_source")?
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
                text: table.text(i, text_fields, &OPTIONAL)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(TrainSet { table, rows })
}

/// The questions of one benchmark file.
#[derive(Debug, Clone)]
pub struct Benchmark {
    /// The file read.
    pub path: PathBuf,
    /// One text per item: its `fields` joined with " ".
    pub questions: Vec<String>,
}

/// Reads a benchmark file: each item's text is its `fields` joined with " "
/// (`["question"]` by default; `["question", "choices"]` for multiple
/// choice, a list of strings joined with " "). Every field is required.
pub fn read_benchmark(path: &Path, fields: &[String]) -> Result<Benchmark> {
    let table = Table::read(path)?;
    let questions = (0..table.len())
        .map(|i| table.text(i, fields, &[]))
        .collect::<Result<_>>()?;
    Ok(Benchmark {
        path: path.to_path_buf(),
        questions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn fields(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("platypus-dataset-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn list_fields_are_joined_and_bad_values_named() {
        let dir = temp_dir("bench");
        let path = write(
            &dir,
            "b.jsonl",
            "{\"question\": \"Q?\", \"choices\": [\"a\", \"b\"]}\n\n{\"question\": \"R\", \"choices\": [1]}\n",
        );
        let err = read_benchmark(&path, &fields(&["question", "choices"])).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("b.jsonl: line 3: \"choices\"[0] is 1, expected a string"),
            "{err}"
        );
        let table = Table::read(&path).unwrap();
        assert_eq!(
            table
                .text(0, &fields(&["question", "choices"]), &[])
                .unwrap(),
            "Q? a b"
        );
        let err = read_benchmark(&path, &fields(&["prompt"])).unwrap_err();
        assert!(
            err.to_string().contains("line 1: has no \"prompt\""),
            "{err}"
        );
    }

    #[test]
    fn rows_are_written_back_as_read() {
        let dir = temp_dir("write");
        for (name, text) in [
            ("t.jsonl", "{\"b\": 1,  \"a\": \"x\"}\n{\"a\": \"y\"}\n"),
            ("t.json", "[{\"b\": 1,  \"a\": \"x\"},\n  {\"a\": \"y\"}]"),
            ("t.csv", "b,a\n1,x\n2,\"y, z\"\n"),
        ] {
            let table = Table::read(&write(&dir, name, text)).unwrap();
            let mut out = Vec::new();
            table.write_rows(&[1, 0], &mut out).unwrap();
            let expected = match table.format() {
                Format::Jsonl => "{\"a\": \"y\"}\n{\"b\": 1,  \"a\": \"x\"}\n",
                Format::Json => "[\n{\"a\": \"y\"},\n{\"b\": 1,  \"a\": \"x\"}\n]\n",
                Format::Csv => "b,a\n2,\"y, z\"\n1,x\n",
                Format::Parquet => unreachable!("no Parquet file in this list"),
            };
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{name}");
        }
        let err = Table::read(&write(&dir, "t.txt", "")).unwrap_err();
        assert!(
            err.to_string()
                .contains("has extension \"txt\"; expected .jsonl, .json, .csv or .parquet"),
            "{err}"
        );
        let err = Table::read(&write(&dir, "t.parquet", "PAR1 not really")).unwrap_err();
        assert!(
            err.to_string()
                .contains("t.parquet: not a readable Parquet file"),
            "{err}"
        );
    }

    /// A Parquet file as pandas or `datasets` write one: large strings, a
    /// list of strings, a dictionary-encoded column, an integer, a null,
    /// two row groups.
    fn parquet_file(path: &Path) -> RecordBatch {
        use arrow_array::builder::{ListBuilder, StringBuilder};
        use arrow_array::{ArrayRef, DictionaryArray, Int64Array, LargeStringArray};
        use std::sync::Arc;
        let mut choices = ListBuilder::new(StringBuilder::new());
        for list in [vec!["a", "b"], vec![], vec!["c"]] {
            for c in list {
                choices.values().append_value(c);
            }
            choices.append(true);
        }
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "question",
                Arc::new(LargeStringArray::from(vec![Some("Q?"), Some("R"), None])),
            ),
            ("choices", Arc::new(choices.finish())),
            (
                "data_source",
                Arc::new(DictionaryArray::<Int32Type>::from_iter(["x", "y", "x"])),
            ),
            ("id", Arc::new(Int64Array::from(vec![7, 8, 9]))),
        ];
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let properties = WriterProperties::builder()
            .set_max_row_group_row_count(Some(2))
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(properties)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        batch
    }

    #[test]
    fn parquet_rows_are_read_as_json_values_and_written_back_with_their_schema() {
        let dir = temp_dir("parquet");
        let path = dir.join("b.parquet");
        let batch = parquet_file(&path);
        let table = Table::read(&path).unwrap();
        assert_eq!((table.format(), table.len()), (Format::Parquet, 3));
        let text = |i, names: &[&str]| table.text(i, &fields(names), &["question"]);
        assert_eq!(text(0, &["question", "choices"]).unwrap(), "Q? a b");
        assert_eq!(text(1, &["question", "choices"]).unwrap(), "R");
        assert_eq!(
            text(2, &["question", "choices", "data_source"]).unwrap(),
            "c x"
        );
        assert_eq!(table.string(1, "data_source").unwrap(), Some("y"));
        let err = text(1, &["id"]).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("b.parquet: row 2: \"id\" is 8, expected a string or a list of strings"),
            "{err}"
        );
        let err = read_benchmark(&path, &fields(&["question"])).unwrap_err();
        assert!(
            err.to_string().contains("row 3: has no \"question\""),
            "{err}"
        );

        let mut out = Vec::new();
        table.write_rows(&[2, 0], &mut out).unwrap();
        let back_path = dir.join("back.parquet");
        std::fs::write(&back_path, out).unwrap();
        let back = Table::read(&back_path).unwrap();
        let back_batch = back.parquet.as_ref().unwrap();
        assert_eq!(back_batch.schema(), batch.schema());
        let indices = UInt64Array::from(vec![2, 0]);
        let want = arrow_select::take::take_record_batch(&batch, &indices).unwrap();
        assert_eq!(back_batch, &want);
        assert_eq!(back.fields(0), table.fields(2));
    }
}
