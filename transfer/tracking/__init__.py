"""Change sources: which ranges of a disk changed since a checkpoint (DESIGN.md "Change source").

Fail closed: a tracker that is missing, inconsistent or unanswered means
"everything changed", never "nothing changed" (RELIABILITY.md R2).
"""
