with

source as (

    select * from {{ source('oppsync', 'users') }}

),

renamed as (

    select
        cast(user_id as text) as user_id,
        cast(name as text) as user_name,
        cast(email as text) as email

    from source

)

select * from renamed
