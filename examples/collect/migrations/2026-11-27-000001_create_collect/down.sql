DROP TABLE answers;
DROP TABLE responses;
DROP TABLE questions;
DROP TABLE forms;
