"""The outcomes dashboard's web page (app.py, a Streamlit script started by `oppsync dashboard`)."""
