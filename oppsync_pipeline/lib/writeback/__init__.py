"""Revenue write-back (seed 000's "Revenue Sync"): revenue known in the warehouse goes back to each CRM's
opportunity, with that CRM's own fields.

  contract.py   the input table (`writeback.opportunity_revenue`): its columns, and per-row validation
  writer.py     what a CRM's writer provides (desired values, current values, the write) and the diff
  audit.py      `oppsync.writeback_log`: every planned, written, refused or failed field
  engine.py     one write-back run of one connection: validate, read, diff, write, verify, audit
  example.py    a small input table for the embedded sandbox (`make run` demonstrates one write per CRM)
  <crm>.py      one writer per CRM, all five alike (the mapping table is each writer's `targets`)
"""
