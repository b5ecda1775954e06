"""Reading ArchEHR-QA and emrQA-MedSQuAD data, building prompts, writing submissions."""

from .archehr import KeyCase, load_cases, load_key, load_xml
from plumbing.errors import InputError
from .records import AnswerSentence, Case, NoteSentence, QuestionPhrase

__all__ = [
    "AnswerSentence",
    "Case",
    "InputError",
    "KeyCase",
    "NoteSentence",
    "QuestionPhrase",
    "load_cases",
    "load_key",
    "load_xml",
]
